"""Fused noise injection: the public functions, their autograd Functions, and backend dispatch.

At the first call for a device type the backend is chosen once and logged (logger "ds_distill.ops"):
CUDA kernel for CUDA tensors when the CUDA op loads, CPU kernel for CPU tensors when the CPU op loads,
else the pure-PyTorch reference. `DS_DISTILL_NOISE_OP=auto|cuda|cpu|reference` overrides the choice.
A kernel that fails to build or load never raises: the reference runs and the reason is logged.

A kernel that loads checks itself once per process, before its first use: forward and backward of both ops
on small fp32 and bf16 tensors against the reference. A mismatch logs one warning and the reference runs for
that device type. `DS_DISTILL_FAULT=noise_op_check` corrupts the kernel's result inside that check (to test
the fallback); `ds-distill report` says which path is live.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .reference import (
    add_noise_reference,
    as_timesteps,
    per_sample,
    sde_step_reference,
)

logger = logging.getLogger("ds_distill.ops")

ENV_VAR = "DS_DISTILL_NOISE_OP"
MODES = ("auto", "cuda", "cpu", "reference")
# dtypes each kernel handles; anything else (or mixed dtypes) runs the reference for that call
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
}


@dataclass(frozen=True)
class Backend:
    """What runs for one device type: 'cuda' | 'cpu' | 'reference', the loaded op module, and why."""

    name: str
    module: object | None
    reason: str


_lock = threading.RLock()
_ops: dict[str, tuple[object | None, str]] = {}  # "cpu" / "cuda" -> (module or None, how it loaded / why not)
_backends: dict[tuple[str, str], Backend] = {}  # (device type, mode) -> choice
_checks: dict[str, str | None] = {}  # "cpu" / "cuda" -> None (kernel agrees with the reference) or the mismatch
FAULT_VAR, FAULT_POINT = "DS_DISTILL_FAULT", "noise_op_check"
_logged: set = set()


def _log_once(key, level, msg, *args):
    if key not in _logged:
        _logged.add(key)
        logger.log(level, msg, *args)


def _short(err: BaseException, limit: int = 400) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    first = text.splitlines()[0] if text else type(err).__name__
    return first if len(first) <= limit else first[:limit] + " ..."


def _load_op(kind: str):
    """(module, description) for the 'cpu' or 'cuda' op; builds/loads once per process, never raises."""
    with _lock:
        if kind in _ops:
            return _ops[kind]
        start = time.perf_counter()
        try:
            from .op_builder import NoiseInjectionCPUBuilder, NoiseInjectionCUDABuilder

            builder = NoiseInjectionCPUBuilder() if kind == "cpu" else NoiseInjectionCUDABuilder()
            if not builder.is_compatible(verbose=False):
                raise RuntimeError(f"op not compatible: {builder.error_log}")
            module = builder.load(verbose=False)
        except Exception as err:  # a broken toolchain must not stop training
            logger.debug("loading the %s noise-injection op failed", kind, exc_info=True)
            result = (None, f"the {kind} op did not load ({_short(err)})")
        else:
            how = "prebuilt" if builder.loaded_from == "prebuilt" else "JIT"
            result = (
                module,
                f"{builder.NAME} loaded ({how}, {time.perf_counter() - start:.1f} s) "
                f"from {getattr(module, '__file__', '?')}",
            )
        _ops[kind] = result
        return result


def _fault_armed() -> bool:
    """`DS_DISTILL_FAULT` names `noise_op_check` (alone or as `noise_op_check@N`, like the other fault points)."""
    parts = os.environ.get(FAULT_VAR, "").split(",")
    return any(p.strip().split("@", 1)[0] == FAULT_POINT for p in parts)


def _compare(name: str, got: Tensor, want: Tensor, tol: float) -> None:
    if got.shape != want.shape or got.dtype != want.dtype:
        raise AssertionError(f"{name}: {got.dtype} {tuple(got.shape)} instead of {want.dtype} {tuple(want.shape)}")
    err = (got.double() - want.double()).abs().max().item()
    bound = tol * max(1.0, want.double().abs().max().item())
    if not err <= bound:  # also catches NaN
        raise AssertionError(f"{name}: max |kernel - reference| = {err:.3g} > {bound:.3g}")


def _self_check(module, device: torch.device) -> None:
    """Raise AssertionError naming the first output where the kernel and the reference disagree."""
    corrupt = _fault_armed()
    g = torch.Generator().manual_seed(1234)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        def rand(*shape):
            return torch.randn(shape, generator=g).to(device=device, dtype=dtype)

        x0, eps, v, grad = rand(3, 4, 37), rand(3, 4, 37), rand(3, 4, 37), rand(3, 4, 37)
        t = torch.tensor([0.0, 417.0, 1000.0], dtype=torch.float64, device=device)
        table = torch.linspace(0, 1, 1001, dtype=torch.float32, device=device) ** 0.5
        for shift, tab in ((3.0, None), (1.0, table)):
            x_t, sigma = module.add_noise_fwd(x0, eps, t, tab, shift, 1000, None)
            if corrupt:
                x_t = x_t + 1
            _compare(f"add_noise {dtype}", x_t, add_noise_reference(x0, eps, t, shift=shift, sigma_table=tab), tol)
            s = sigma.view(-1, 1, 1).to(torch.float32)
            gx0, geps = module.add_noise_bwd(grad, sigma)
            _compare(f"add_noise backward (x0) {dtype}", gx0, ((1 - s) * grad.float()).to(dtype), tol)
            _compare(f"add_noise backward (eps) {dtype}", geps, (s * grad.float()).to(dtype), tol)
        st = torch.tensor([0.9, 0.5, 0.1], device=device)
        sn = torch.tensor([0.6, 0.2, 0.0], device=device)
        x0_hat, x_next = module.sde_fwd(x0, v, eps, st, sn, None, None)
        want0, want1 = sde_step_reference(x0, v, st, sn, eps)
        _compare(f"sde_step x0_hat {dtype}", x0_hat, want0, tol)
        _compare(f"sde_step x_next {dtype}", x_next, want1, tol)
        leaves = [x.detach().float().requires_grad_(True) for x in (x0, v, eps)]
        r0, r1 = sde_step_reference(*leaves[:2], st, sn, leaves[2])
        want = torch.autograd.grad((r0 * grad.float()).sum() + (r1 * v.float()).sum(), leaves)
        got = module.sde_bwd(grad, v, st, sn)
        for name, a, b in zip(("x_t", "v", "eps"), got, want):
            _compare(f"sde_step backward ({name}) {dtype}", a, b.to(dtype), tol)


def _verified(kind: str, module) -> str | None:
    """None if the `kind` kernel agrees with the reference (checked once per process), else what differed."""
    if kind not in _checks:
        device = torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")
        try:  # the first call may come from inside no_grad or inference_mode: the check needs autograd
            with torch.inference_mode(False), torch.enable_grad():
                _self_check(module, device)
        except Exception as err:  # a wrong or crashing kernel must not stop training
            logger.debug("the %s noise-injection kernel failed its self-check", kind, exc_info=True)
            _checks[kind] = _short(err)
        else:
            _checks[kind] = None
    return _checks[kind]


def _loaded(kind: str, module, why: str) -> Backend:
    """The kernel's backend if it passes its self-check, else the reference with the reason."""
    if module is None:
        return Backend("reference", None, why)
    mismatch = _verified(kind, module)
    if mismatch is not None:
        return Backend("reference", None, f"{why}, but the {kind} kernel failed its self-check against the "
                                          f"reference ({mismatch}); falling back to the reference")
    return Backend(kind, module, f"{why}; verified against the reference")


def _mode() -> str:
    raw = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if raw not in MODES:
        _log_once(("bad-mode", raw), logging.WARNING, "%s=%r is not one of %s; using auto", ENV_VAR, raw, MODES)
        return "auto"
    return raw


def _choose(device_type: str, mode: str) -> Backend:
    if mode == "reference":
        return Backend("reference", None, f"{ENV_VAR}=reference")
    if device_type == "cuda":
        if mode == "cpu":
            return Backend("reference", None, f"{ENV_VAR}=cpu and the CPU kernel cannot take CUDA tensors")
        if not torch.cuda.is_available():  # nothing could run it; do not spend minutes building it
            return Backend("reference", None, "no CUDA device is available")
        module, why = _load_op("cuda")
        return _loaded("cuda", module, why)
    if device_type == "cpu":
        note = f"{ENV_VAR}=cuda but the tensors are on the CPU; " if mode == "cuda" else ""
        module, why = _load_op("cpu")
        return _loaded("cpu", module, note + why)
    return Backend("reference", None, f"no kernel for {device_type} tensors")


def _select(device_type: str) -> Backend:
    mode = _mode()
    key = (device_type, mode)
    backend = _backends.get(key)
    if backend is None:
        with _lock:
            backend = _backends.get(key)
            if backend is None:
                backend = _choose(device_type, mode)
                _backends[key] = backend
                failed = backend.name == "reference" and ("did not load" in backend.reason
                                                          or "self-check" in backend.reason)
                _log_once(
                    ("backend",) + key,
                    logging.WARNING if failed else logging.INFO,
                    "noise injection on %s tensors uses the %s: %s",
                    device_type,
                    "reference (pure PyTorch)" if backend.name == "reference" else f"{backend.name} kernel",
                    backend.reason,
                )
    return backend


def noise_op_status(device_type: str = "cpu") -> str:
    """One line: what runs for tensors of this device type and why (loads and self-checks the op if needed)."""
    backend = _select(torch.device(device_type).type)
    name = "reference" if backend.name == "reference" else f"{backend.name} kernel"
    return f"{name} ({backend.reason})"


def noise_op_backend(device_type: str = "cpu") -> str:
    """'cuda' | 'cpu' | 'reference': what would run now for tensors of this device type (loads the op if needed)."""
    return _select(torch.device(device_type).type).name


def _reset_dispatch(forget_loaded_ops: bool = False) -> None:
    """Forget the backend choices (and optionally the loaded ops) so the next call chooses again. For tests."""
    with _lock:
        _backends.clear()
        _logged.clear()
        _checks.clear()
        if forget_loaded_ops:
            _ops.clear()


def _kernel(backend: Backend, main: Tensor, others) -> object | None:
    """The op module if this call can run on it: supported dtype, all tensors alike, else None (reference)."""
    if backend.module is None:
        return None
    dtype, device = main.dtype, main.device
    if dtype not in KERNEL_DTYPES[backend.name]:
        _log_once(("dtype", backend.name, dtype), logging.INFO,
                  "the %s noise-injection kernel has no %s path; those calls use the reference", backend.name, dtype)
        return None
    for t in others:
        if t is not None and (t.dtype != dtype or t.device != device):
            return None
    return backend.module


def _check_out(out: Tensor | None, like: Tensor, name: str) -> None:
    if out is None:
        return
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"{name} must be a {like.dtype} tensor of shape {tuple(like.shape)} on {like.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )


def _no_grad_out(needs_grad: bool) -> None:
    if needs_grad:
        raise RuntimeError("out= does not support autograd (an input requires grad); call it without out=")


class _AddNoise(torch.autograd.Function):
    """x_t = (1 - sigma)*x0 + sigma*eps in one kernel; backward (1 - sigma)*g, sigma*g in one kernel."""

    @staticmethod
    def forward(ctx, x0, eps, timesteps, sigma_table, shift, num_train_timesteps, module):
        x_t, sigma = module.add_noise_fwd(x0, eps, timesteps, sigma_table, shift, num_train_timesteps, None)
        ctx.save_for_backward(sigma)
        ctx.module = module
        return x_t

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (sigma,) = ctx.saved_tensors
        grad_x0, grad_eps = ctx.module.add_noise_bwd(grad, sigma)
        need_x0, need_eps = ctx.needs_input_grad[:2]
        return (grad_x0 if need_x0 else None, grad_eps if need_eps else None) + (None,) * 5


class _SdeStep(torch.autograd.Function):
    """(x0_hat, x_next) in one kernel, and their backward in one kernel."""

    @staticmethod
    def forward(ctx, x_t, v, eps, sigma_t, sigma_next, module):
        ctx.set_materialize_grads(False)
        x0_hat, x_next = module.sde_fwd(x_t, v, eps, sigma_t, sigma_next, None, None)
        ctx.save_for_backward(sigma_t, sigma_next)
        ctx.module = module
        return x0_hat, x_next

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x0_hat, grad_x_next):
        if grad_x0_hat is None and grad_x_next is None:
            return (None,) * 6
        sigma_t, sigma_next = ctx.saved_tensors
        if grad_x0_hat is None:
            grad_x0_hat = torch.zeros_like(grad_x_next)
        grad_x, grad_v, grad_eps = ctx.module.sde_bwd(grad_x0_hat, grad_x_next, sigma_t, sigma_next)
        need = ctx.needs_input_grad
        return (grad_x if need[0] else None, grad_v if need[1] else None, grad_eps if need[2] else None) + (None,) * 3


class _SdeLastStep(torch.autograd.Function):
    """x0_hat = x_t - sigma_t*v (the last SDE step, no re-noising)."""

    @staticmethod
    def forward(ctx, x_t, v, sigma_t, module):
        x0_hat, _ = module.sde_fwd(x_t, v, None, sigma_t, sigma_t, None, None)
        ctx.save_for_backward(sigma_t)
        ctx.module = module
        return x0_hat

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x0_hat):
        (sigma_t,) = ctx.saved_tensors
        grad_x, grad_v, _ = ctx.module.sde_bwd(grad_x0_hat, None, sigma_t, sigma_t)
        need = ctx.needs_input_grad
        return grad_x if need[0] else None, grad_v if need[1] else None, None, None


def add_noise(
    x0: Tensor,
    eps: Tensor,
    timesteps,
    *,
    shift: float = 1.0,
    sigma_table: Tensor | None = None,
    num_train_timesteps: int = 1000,
    out: Tensor | None = None,
) -> Tensor:
    """x_t = (1 - sigma)*x0 + sigma*eps, sigma per sample from `timesteps` (shifted schedule or table).

    x0, eps: same shape [B, ...], any strides; timesteps: [B] tensor (float or int), 0-d tensor or number.
    Returns x0's dtype, math in fp32. Differentiable w.r.t. x0 and eps. `out=` (no autograd) writes into a
    preallocated tensor, as torch ops do.
    """
    if x0.shape != eps.shape:
        raise ValueError(f"x0 and eps must have the same shape, got {tuple(x0.shape)} and {tuple(eps.shape)}")
    if x0.dim() < 1:
        raise ValueError("x0 must have a batch dimension (rank >= 1)")
    _check_out(out, x0, "out")
    needs_grad = torch.is_grad_enabled() and (x0.requires_grad or eps.requires_grad)
    if out is not None:
        _no_grad_out(needs_grad)
    module = _kernel(_select(x0.device.type), x0, (eps,))
    if module is None:
        x_t = add_noise_reference(
            x0, eps, timesteps, shift=shift, sigma_table=sigma_table, num_train_timesteps=num_train_timesteps
        )
        return x_t if out is None else out.copy_(x_t)
    t = as_timesteps(timesteps, x0.shape[0], x0.device).to(torch.float64)
    if torch.is_tensor(timesteps) and timesteps.requires_grad:
        t = t.detach()
    table = None
    if sigma_table is not None:
        table = sigma_table.detach().to(device=x0.device, dtype=torch.float32).reshape(-1).contiguous()
    shift, num_train_timesteps = float(shift), int(num_train_timesteps)
    if needs_grad:
        return _AddNoise.apply(x0, eps, t, table, shift, num_train_timesteps, module)
    direct = out if out is not None and out.is_contiguous() else None
    x_t, _ = module.add_noise_fwd(x0, eps, t, table, shift, num_train_timesteps, direct)
    if out is not None and direct is None:
        return out.copy_(x_t)
    return x_t


def sde_step(
    x_t: Tensor,
    v: Tensor,
    sigma_t,
    sigma_next,
    eps: Tensor | None,
    *,
    out: tuple[Tensor, Tensor | None] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(x0_hat, x_next) = (x_t - sigma_t*v, (1 - sigma_next)*x0_hat + sigma_next*eps) in one pass.

    sigma_t, sigma_next: [B] tensors or python floats (not differentiated). `eps=None` is the last step:
    returns (x0_hat, None). Outputs have x_t's dtype, math in fp32. Differentiable w.r.t. x_t, v, eps.
    `out=(x0_hat_out, x_next_out)` (no autograd) writes into preallocated tensors.
    """
    if x_t.shape != v.shape or (eps is not None and eps.shape != x_t.shape):
        raise ValueError("x_t, v and eps must have the same shape")
    if x_t.dim() < 1:
        raise ValueError("x_t must have a batch dimension (rank >= 1)")
    out_x0, out_next = (None, None) if out is None else out
    _check_out(out_x0, x_t, "out[0]")
    _check_out(out_next, x_t, "out[1]")
    if out is not None and (out_x0 is None or (eps is not None and out_next is None)):
        raise ValueError("out= needs a tensor for x0_hat, and one for x_next unless eps is None")
    inputs = (x_t, v) if eps is None else (x_t, v, eps)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    if out is not None:
        _no_grad_out(needs_grad)
    module = _kernel(_select(x_t.device.type), x_t, (v, eps))
    if module is None:
        x0_hat, x_next = sde_step_reference(x_t, v, sigma_t, sigma_next, eps)
        if out is None:
            return x0_hat, x_next
        return out_x0.copy_(x0_hat), (None if eps is None else out_next.copy_(x_next))
    batch = x_t.shape[0]
    st = per_sample(sigma_t, batch, x_t.device, "sigma_t").detach()
    sn = st if eps is None else per_sample(sigma_next, batch, x_t.device, "sigma_next").detach()
    if needs_grad:
        if eps is None:
            return _SdeLastStep.apply(x_t, v, st, module), None
        return _SdeStep.apply(x_t, v, eps, st, sn, module)
    d0 = out_x0 if out_x0 is not None and out_x0.is_contiguous() else None
    d1 = out_next if out_next is not None and out_next.is_contiguous() else None
    x0_hat, x_next = module.sde_fwd(x_t, v, eps, st, sn, d0, d1)
    if out is not None:
        if d0 is None:
            out_x0.copy_(x0_hat)
        if eps is not None and d1 is None:
            out_next.copy_(x_next)
        return out_x0, (None if eps is None else out_next)
    return x0_hat, x_next

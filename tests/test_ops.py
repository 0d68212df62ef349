"""Fused noise-injection ops: the C++ CPU kernel against the PyTorch reference, autograd, dispatch, report.

The CPU op is JIT-built once per machine (~40 s, cached in torch's extension cache) by a session fixture.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds_distill import ops
from ds_distill.ops import (
    add_noise,
    add_noise_reference,
    noise_op_backend,
    sde_step,
    sde_step_reference,
    sigma_from_timestep,
)
from ds_distill.ops import noise_injection
from ds_distill.ops.op_builder import NoiseInjectionCPUBuilder

REPO = Path(__file__).resolve().parents[1]
KERNEL_DTYPES = [torch.float32, torch.bfloat16, torch.float64]
# (shape, why): rank 1..5, batch 1..8, per-sample sizes that are not multiples of the 16-wide SIMD step,
# and one that spans several threads' chunks
SHAPES = [
    (7,),
    (1, 1),
    (3, 5),
    (8, 33),
    (2, 4, 3, 9, 11),
    (5, 16, 2, 8, 8),
    (3, 70001),
]


def tol(dtype):
    return {"rtol": 1.6e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-6, "atol": 1e-6}


def timesteps_for(batch: int, gen: torch.Generator) -> torch.Tensor:
    """Random timesteps that always include the ends of the schedule, 0 and 1000, when batch allows."""
    t = torch.rand(batch, generator=gen) * 1000
    t[0] = 0.0
    if batch > 1:
        t[-1] = 1000.0
    return t


@pytest.fixture(scope="session")
def cpu_op():
    """The CPU kernel module, built or loaded from the cache once per session."""
    builder = NoiseInjectionCPUBuilder()
    if not builder.is_compatible(verbose=False):
        pytest.skip(f"the CPU op cannot be built here: {builder.error_log}")
    module, why = noise_injection._load_op("cpu")
    assert module is not None, why
    return module


@pytest.fixture
def kernel(cpu_op, monkeypatch):
    """Default dispatch (no override), with the CPU kernel selected for CPU tensors."""
    monkeypatch.delenv(noise_injection.ENV_VAR, raising=False)
    noise_injection._reset_dispatch()
    assert noise_op_backend("cpu") == "cpu"
    yield cpu_op
    noise_injection._reset_dispatch()


@pytest.fixture
def fresh_dispatch(monkeypatch):
    monkeypatch.delenv(noise_injection.ENV_VAR, raising=False)
    noise_injection._reset_dispatch()
    yield monkeypatch
    noise_injection._reset_dispatch()


# ---- sigma -----------------------------------------------------------------------------------------


def test_sigma_from_timestep_shift_formula():
    t = torch.tensor([0, 100, 250, 500, 750, 999, 1000, 1500, -20])
    for shift in (1.0, 3.0, 5.0, 0.5):
        sigma = sigma_from_timestep(t, shift)
        u = (t.double() / 1000).clamp(0, 1)
        expected = shift * u / (1 + (shift - 1) * u)
        assert sigma.dtype == torch.float32 and sigma.shape == t.shape
        torch.testing.assert_close(sigma.double(), expected, rtol=1e-6, atol=1e-7)
        assert sigma[0] == 0.0 and sigma[6] == 1.0  # t = 0 and t = 1000 are exact
    torch.testing.assert_close(sigma_from_timestep(t, 3.0), sigma_from_timestep(t.double(), 3.0))
    torch.testing.assert_close(sigma_from_timestep(t * 2, 3.0, num_train_timesteps=2000),
                               sigma_from_timestep(t, 3.0))


def test_sigma_from_timestep_table_rounds_and_clamps():
    table = torch.linspace(1.0, 0.0, 1000)
    t = torch.tensor([0.0, 0.4, 0.5, 1.5, 2.5, 998.6, 999.0, 1200.0, -7.0])
    expected_index = torch.tensor([0, 0, 0, 2, 2, 999, 999, 999, 0])  # round half to even, then clamp
    assert torch.equal(sigma_from_timestep(t, sigma_table=table), table[expected_index])
    assert torch.equal(sigma_from_timestep(t.long(), sigma_table=table), table[t.long().clamp(0, 999)])


def test_kernel_sigma_matches_reference(cpu_op):
    gen = torch.Generator().manual_seed(0)
    t = torch.cat([torch.rand(64, generator=gen) * 1200 - 100, torch.tensor([0.0, 1000.0, 0.5, 1.5, 999.5])])
    table = torch.rand(1000, generator=gen)
    for shift in (1.0, 3.0, 7.5):
        assert torch.equal(cpu_op.sigma_from_timestep(t, None, shift, 1000), sigma_from_timestep(t, shift))
    assert torch.equal(cpu_op.sigma_from_timestep(t, table, 1.0, 1000), sigma_from_timestep(t, sigma_table=table))


# ---- add_noise against the reference ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_noise_matches_reference(kernel, dtype, shape):
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    x0 = torch.randn(shape, generator=gen).to(dtype)
    eps = torch.randn(shape, generator=gen).to(dtype)
    t = timesteps_for(shape[0], gen)
    for kwargs in ({}, {"shift": 3.0}, {"shift": 5.0, "num_train_timesteps": 1000},
                   {"sigma_table": torch.linspace(1, 0, 1000)}):
        got = add_noise(x0, eps, t, **kwargs)
        want = add_noise_reference(x0, eps, t, **kwargs)
        assert got.dtype == dtype and got.shape == x0.shape
        torch.testing.assert_close(got, want, **tol(dtype))


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_add_noise_is_bit_exact_with_reference(kernel, dtype):
    """Same op order and no FMA contraction (-ffp-contract=off): the kernel reproduces the reference exactly."""
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 3, 17, 19, generator=gen).to(dtype)
    eps = torch.randn(4, 3, 17, 19, generator=gen).to(dtype)
    t = torch.tensor([0, 333, 777, 1000])
    assert torch.equal(add_noise(x0, eps, t, shift=3.0), add_noise_reference(x0, eps, t, shift=3.0))


def test_add_noise_timesteps_0_and_1000_are_endpoints(kernel):
    x0, eps = torch.randn(2, 64), torch.randn(2, 64)
    for dtype in KERNEL_DTYPES:
        x_t = add_noise(x0.to(dtype), eps.to(dtype), torch.tensor([0, 1000]), shift=3.0)
        assert torch.equal(x_t[0], x0[0].to(dtype)) and torch.equal(x_t[1], eps[1].to(dtype))


@pytest.mark.parametrize("layout", ["transposed", "strided", "batch-strided", "channels_last", "expanded"])
def test_add_noise_non_contiguous(kernel, layout):
    gen = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        base = torch.randn(6, 4, 9, 10, generator=gen).to(dtype)
        other = torch.randn(6, 4, 9, 10, generator=gen).to(dtype)
        if layout == "transposed":
            x0, eps = base.transpose(-1, -2), other.transpose(-1, -2).contiguous()
        elif layout == "strided":
            x0, eps = base[..., ::2], other[..., 1::2]
        elif layout == "batch-strided":
            x0, eps = base[::2], other[1::2]
        elif layout == "channels_last":
            x0 = base.contiguous(memory_format=torch.channels_last)
            eps = other.contiguous(memory_format=torch.channels_last)
        else:
            x0, eps = base, other[:, :1].expand_as(other)
        assert not (x0.is_contiguous() and eps.is_contiguous())
        t = torch.linspace(0, 1000, x0.shape[0])
        torch.testing.assert_close(add_noise(x0, eps, t, shift=3.0),
                                   add_noise_reference(x0, eps, t, shift=3.0), **tol(dtype))


@pytest.mark.parametrize(
    "timesteps",
    [500, 250.5, torch.tensor(750.0), torch.tensor([0, 500, 1000]), torch.tensor([[0.0], [500.0], [1000.0]]),
     torch.tensor([10, 20, 30], dtype=torch.int32), torch.tensor([1.0, 2.0, 999.0], dtype=torch.float64)],
    ids=["int", "float", "0-d", "int64", "[B,1]", "int32", "float64"],
)
def test_add_noise_timestep_forms(kernel, timesteps):
    x0, eps = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    torch.testing.assert_close(add_noise(x0, eps, timesteps, shift=3.0),
                               add_noise_reference(x0, eps, timesteps, shift=3.0), rtol=0, atol=0)


def test_add_noise_rejects_bad_inputs(kernel):
    with pytest.raises(ValueError):
        add_noise(torch.randn(2, 3), torch.randn(2, 4), 5)
    with pytest.raises(ValueError):
        add_noise(torch.randn(()), torch.randn(()), 5)
    with pytest.raises(ValueError):
        add_noise(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([1, 2, 3]))


def test_empty_tensors(kernel):
    for shape in ((0, 4), (3, 0)):
        x0 = torch.randn(shape, requires_grad=True)
        x_t = add_noise(x0, torch.randn(shape), torch.zeros(shape[0]))
        assert x_t.shape == shape
        x_t.sum().backward()
        x0_hat, x_next = sde_step(torch.randn(shape), torch.randn(shape), 0.5, 0.25, torch.randn(shape))
        assert x0_hat.shape == x_next.shape == shape


def test_unsupported_dtypes_fall_back_to_reference(kernel):
    x0, eps = torch.randn(2, 8, dtype=torch.float16), torch.randn(2, 8, dtype=torch.float16)
    torch.testing.assert_close(add_noise(x0, eps, 300), add_noise_reference(x0, eps, 300))
    mixed = add_noise(torch.randn(2, 8), torch.randn(2, 8).bfloat16(), 300)
    assert mixed.dtype == torch.float32


def test_threads_do_not_change_results(kernel):
    gen = torch.Generator().manual_seed(3)
    x0, eps, v = (torch.randn(3, 200003, generator=gen) for _ in range(3))
    t = torch.tensor([0.0, 500.0, 1000.0])
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append((add_noise(x0, eps, t, shift=3.0), *sde_step(x0, v, t / 1000, t / 2000, eps)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_streaming_store_and_huge_page_paths(kernel, dtype):
    """Force the non-temporal-store and huge-page paths on small tensors, aligned and misaligned outputs."""
    nt, huge = kernel.streaming_store_threshold(), kernel.huge_page_threshold()
    gen = torch.Generator().manual_seed(4)
    shape = (3, 4099)
    x0, eps, v = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    t = torch.tensor([0.0, 400.0, 1000.0])
    try:
        kernel.set_streaming_store_threshold(0)
        kernel.set_huge_page_threshold(0)
        want = add_noise_reference(x0, eps, t, shift=3.0)
        assert torch.equal(add_noise(x0, eps, t, shift=3.0), want)
        buffer = torch.empty(x0.numel() + 1, dtype=dtype)
        misaligned = buffer[1:].view(shape)  # contiguous, 2 or 4 bytes off the 32-byte boundary
        assert torch.equal(add_noise(x0, eps, t, shift=3.0, out=misaligned), want)
        want_sde = sde_step_reference(x0, v, t / 1000, t / 3000, eps)
        got_sde = sde_step(x0, v, t / 1000, t / 3000, eps)  # fresh outputs: huge pages, plain stores
        assert all(torch.equal(a, b) for a, b in zip(got_sde, want_sde))
        # given outputs: streaming stores to both, after peeling to the line boundary
        buffers = [torch.empty(x0.numel() + 1, dtype=dtype) for _ in range(2)]
        outs = tuple(b[1:].view(shape) for b in buffers)
        got_sde = sde_step(x0, v, t / 1000, t / 3000, eps, out=outs)
        assert all(torch.equal(a, b) for a, b in zip(got_sde, want_sde))
        assert all(a.data_ptr() == b.data_ptr() for a, b in zip(got_sde, outs))
    finally:
        kernel.set_streaming_store_threshold(nt)
        kernel.set_huge_page_threshold(huge)


def test_huge_pages_are_opt_in(cpu_op):
    """Off unless DS_DISTILL_HUGE_PAGES=1 (advised regions may compact memory synchronously at first touch)."""
    if "DS_DISTILL_HUGE_PAGES" not in os.environ:
        assert cpu_op.huge_page_threshold() > 2**62
    # the built module itself, in a fresh process (the variable is read when the library loads)
    code = ("import sys, importlib.util, torch; "
            "spec = importlib.util.spec_from_file_location(sys.argv[1], sys.argv[2]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print(m.huge_page_threshold())")
    out = subprocess.run([sys.executable, "-c", code, cpu_op.__name__, cpu_op.__file__], cwd=REPO,
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, DS_DISTILL_HUGE_PAGES="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) == 32 * 2**20


def test_add_noise_out(kernel):
    x0, eps = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    t = torch.tensor([0, 10, 500, 1000])
    want = add_noise_reference(x0, eps, t, shift=2.0)
    out = torch.empty_like(x0)
    assert add_noise(x0, eps, t, shift=2.0, out=out) is out and torch.equal(out, want)
    strided = torch.empty(4, 3, 16)[..., ::2]
    assert add_noise(x0, eps, t, shift=2.0, out=strided) is strided and torch.equal(strided, want)
    with pytest.raises(ValueError):
        add_noise(x0, eps, t, out=torch.empty(4, 3, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError):
        add_noise(x0.requires_grad_(), eps, t, out=out)


# ---- sde_step against the reference -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_sde_step_matches_reference(kernel, dtype, shape):
    gen = torch.Generator().manual_seed(hash(shape) % 1000 + 1)
    x_t, v, eps = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    batch = shape[0]
    sigma_t = torch.rand(batch, generator=gen)
    sigma_next = sigma_t * torch.rand(batch, generator=gen)
    for st, sn in ((sigma_t, sigma_next), (0.75, 0.5), (1.0, 0.0), (torch.tensor(0.3), 0.1)):
        got = sde_step(x_t, v, st, sn, eps)
        want = sde_step_reference(x_t, v, st, sn, eps)
        for a, b in zip(got, want):
            assert a.dtype == dtype and a.shape == x_t.shape
            torch.testing.assert_close(a, b, **tol(dtype))
    x0_hat, none = sde_step(x_t, v, sigma_t, None, None)
    assert none is None
    torch.testing.assert_close(x0_hat, sde_step_reference(x_t, v, sigma_t, None, None)[0], **tol(dtype))


def test_sde_step_non_contiguous_and_out(kernel):
    gen = torch.Generator().manual_seed(5)
    x_t = torch.randn(3, 4, 10, 12, generator=gen).transpose(-1, -2)
    v = torch.randn(3, 4, 12, 20, generator=gen)[..., ::2]
    eps = torch.randn(3, 4, 12, 10, generator=gen)
    st, sn = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.6, 0.3, 0.0])
    want = sde_step_reference(x_t, v, st, sn, eps)
    for a, b in zip(sde_step(x_t, v, st, sn, eps), want):
        assert torch.equal(a, b)
    outs = (torch.empty(3, 4, 12, 10), torch.empty(3, 4, 12, 20)[..., ::2])
    got = sde_step(x_t, v, st, sn, eps, out=outs)
    assert got[0] is outs[0] and got[1] is outs[1]
    assert torch.equal(outs[0], want[0]) and torch.equal(outs[1], want[1])
    last = sde_step(x_t, v, st, None, None, out=(torch.empty(3, 4, 12, 10), None))
    assert last[1] is None and torch.equal(last[0], want[0])


# ---- autograd -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_add_noise_grads_match_reference(kernel, dtype):
    gen = torch.Generator().manual_seed(6)
    x0_data, eps_data = torch.randn(4, 3, 5, 7, generator=gen), torch.randn(4, 3, 5, 7, generator=gen)
    weight = torch.randn(4, 3, 5, 7, generator=gen)
    t = torch.tensor([0, 300, 700, 1000])
    grads = []
    for fn in (add_noise, add_noise_reference):
        x0 = x0_data.to(dtype).requires_grad_()
        eps = eps_data.to(dtype).requires_grad_()
        x_t = fn(x0, eps, t, shift=3.0)
        (x_t.float() * weight).sum().backward()
        grads.append((x0.grad, eps.grad))
        if fn is add_noise:
            assert type(x_t.grad_fn).__name__ == "_AddNoiseBackward"
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **tol(dtype))
    only_eps = torch.randn(2, 5, requires_grad=True)
    add_noise(torch.randn(2, 5), only_eps, 500).sum().backward()
    torch.testing.assert_close(only_eps.grad, torch.full((2, 5), 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("use", ["both", "x0_hat", "x_next", "last"])
def test_sde_step_grads_match_reference(kernel, dtype, use):
    gen = torch.Generator().manual_seed(7)
    data = [torch.randn(3, 4, 6, generator=gen) for _ in range(3)]
    w0, w1 = torch.randn(3, 4, 6, generator=gen), torch.randn(3, 4, 6, generator=gen)
    st, sn = torch.tensor([0.9, 0.5, 0.1]), torch.tensor([0.5, 0.2, 0.0])
    grads = []
    for fn in (sde_step, sde_step_reference):
        x_t, v, eps = (d.to(dtype).requires_grad_() for d in data)
        x0_hat, x_next = fn(x_t, v, st, sn, None if use == "last" else eps)
        loss = 0
        if use in ("both", "x0_hat", "last"):
            loss = loss + (x0_hat.float() * w0).sum()
        if use in ("both", "x_next"):
            loss = loss + (x_next.float() * w1).sum()
        loss.backward()
        grads.append((x_t.grad, v.grad, eps.grad))
    for a, b in zip(*grads):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, b, **tol(dtype))


def test_gradcheck_add_noise_uses_custom_backward(kernel):
    """fp64 runs the CPU kernel, so gradcheck checks the Function's backward formula (not autograd's)."""
    x0 = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 420.0, 1000.0])
    assert type(add_noise(x0, eps, t).grad_fn).__name__ == "_AddNoiseBackward"
    assert torch.autograd.gradcheck(lambda a, b: add_noise(a, b, t, shift=3.0), (x0, eps))
    table = torch.rand(1001)
    assert torch.autograd.gradcheck(lambda a, b: add_noise(a, b, t, sigma_table=table), (x0, eps))


def test_gradcheck_sde_step_uses_custom_backward(kernel):
    x_t, v, eps = (torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True) for _ in range(3))
    st, sn = torch.tensor([0.9, 0.4, 0.05]), torch.tensor([0.6, 0.1, 0.0])
    x0_hat, x_next = sde_step(x_t, v, st, sn, eps)
    assert type(x0_hat.grad_fn).__name__ == type(x_next.grad_fn).__name__ == "_SdeStepBackward"
    assert type(sde_step(x_t, v, st, None, None)[0].grad_fn).__name__ == "_SdeLastStepBackward"
    assert torch.autograd.gradcheck(lambda a, b, c: sde_step(a, b, st, sn, c), (x_t, v, eps))
    assert torch.autograd.gradcheck(lambda a, b: sde_step(a, b, st, None, None)[0], (x_t, v))
    assert torch.autograd.gradcheck(lambda a, b, c: sde_step(a, b, 0.7, 0.3, c)[1], (x_t, v, eps))


# ---- dispatch, override, fallback, laziness -----------------------------------------------------------


def test_auto_picks_cpu_kernel_and_logs_once(cpu_op, fresh_dispatch, caplog):
    with caplog.at_level(logging.INFO, logger="ds_distill.ops"):
        assert noise_op_backend("cpu") == "cpu"
        add_noise(torch.randn(2, 3), torch.randn(2, 3), 10)
        add_noise(torch.randn(2, 3), torch.randn(2, 3), 10)
    records = [r for r in caplog.records if r.name == "ds_distill.ops"]
    assert len(records) == 1 and "cpu kernel" in records[0].getMessage()


@pytest.mark.parametrize(
    "mode, expected, reason",
    [("reference", "reference", "DS_DISTILL_NOISE_OP=reference"), ("cpu", "cpu", "loaded"),
     ("cuda", "cpu", "tensors are on the CPU"), ("AUTO", "cpu", "loaded"), ("bogus", "cpu", "not one of")],
)
def test_env_override(cpu_op, fresh_dispatch, caplog, mode, expected, reason):
    fresh_dispatch.setenv(noise_injection.ENV_VAR, mode)
    with caplog.at_level(logging.INFO, logger="ds_distill.ops"):
        assert noise_op_backend("cpu") == expected
    assert reason in caplog.text
    x0, eps = torch.randn(2, 9), torch.randn(2, 9)
    torch.testing.assert_close(add_noise(x0, eps, 300), add_noise_reference(x0, eps, 300))


def test_cuda_tensors_without_a_device_use_reference(fresh_dispatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert noise_op_backend("cuda") == "reference"
    assert noise_injection._select("cuda").reason == "no CUDA device is available"


def test_build_failure_falls_back_to_reference(cpu_op, fresh_dispatch, caplog):
    def broken_load(self, verbose=False):
        raise RuntimeError("simulated compiler error")

    noise_injection._reset_dispatch(forget_loaded_ops=True)
    fresh_dispatch.setattr(NoiseInjectionCPUBuilder, "load", broken_load)
    try:
        with caplog.at_level(logging.INFO, logger="ds_distill.ops"):
            x0 = torch.randn(2, 9, requires_grad=True)
            eps = torch.randn(2, 9)
            x_t = add_noise(x0, eps, 300)
            assert noise_op_backend("cpu") == "reference"
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "ds_distill.ops"]
        assert len(warnings) == 1 and "simulated compiler error" in warnings[0].getMessage()
        torch.testing.assert_close(x_t, add_noise_reference(x0, eps, 300))
        x_t.sum().backward()  # the reference path is differentiable too
        assert x0.grad is not None
    finally:
        fresh_dispatch.undo()
        noise_injection._reset_dispatch(forget_loaded_ops=True)
    assert noise_op_backend("cpu") == "cpu"  # loads again (from the cache) once the toolchain is back


@pytest.mark.parametrize("context", ["grad", "no_grad", "inference_mode"])
def test_kernel_self_check_passes_and_is_reported(cpu_op, fresh_dispatch, caplog, context):
    """The first call may come from a sampler's no_grad / inference_mode block: the check still passes."""
    ctx = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[context]
    with caplog.at_level(logging.INFO, logger="ds_distill.ops"), ctx():
        x_t = add_noise(torch.ones(2, 3), torch.zeros(2, 3), 500)
    assert noise_injection._select("cpu").name == "cpu"
    assert "verified against the reference" in caplog.text
    assert noise_injection._checks == {"cpu": None}
    torch.testing.assert_close(x_t, torch.full((2, 3), 0.5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (tools/gpu_check.sh runs it)")
def test_cuda_kernel_passes_its_self_check(fresh_dispatch, caplog):
    with caplog.at_level(logging.INFO, logger="ds_distill.ops"):
        assert noise_op_backend("cuda") == "cuda", noise_injection._select("cuda").reason
    assert noise_injection._checks["cuda"] is None and "verified against the reference" in caplog.text
    x0, eps = torch.randn(4, 1000, device="cuda"), torch.randn(4, 1000, device="cuda")
    t = torch.tensor([0.0, 250.0, 600.0, 1000.0], device="cuda")
    torch.testing.assert_close(add_noise(x0, eps, t, shift=3.0), add_noise_reference(x0, eps, t, shift=3.0))


def test_kernel_failing_its_self_check_falls_back_once(cpu_op, fresh_dispatch, caplog):
    """DS_DISTILL_FAULT=noise_op_check corrupts the kernel's result inside the check: one warning, then the
    reference runs (forward and backward) for the rest of the process."""
    fresh_dispatch.setenv("DS_DISTILL_FAULT", "noise_op_check@0")
    with caplog.at_level(logging.INFO, logger="ds_distill.ops"):
        x0 = torch.randn(2, 9, requires_grad=True)
        eps = torch.randn(2, 9)
        x_t = add_noise(x0, eps, 300, shift=3.0)
        x0_hat, x_next = sde_step(x0.detach(), eps, 0.7, 0.4, eps)
        assert noise_op_backend("cpu") == "reference"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "ds_distill.ops"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "failed its self-check" in warnings[0].getMessage() and "add_noise" in warnings[0].getMessage()
    torch.testing.assert_close(x_t, add_noise_reference(x0, eps, 300, shift=3.0), rtol=0, atol=0)
    want = sde_step_reference(x0.detach(), eps, 0.7, 0.4, eps)
    torch.testing.assert_close((x0_hat, x_next), want, rtol=0, atol=0)
    x_t.sum().backward()
    torch.testing.assert_close(x0.grad, torch.full_like(x0, 1 - 3 * 0.3 / (1 + 2 * 0.3)), rtol=1e-6, atol=1e-6)


def test_report_says_which_path_is_live(cpu_op, capsys, fresh_dispatch):
    from ds_distill.report import main

    assert main(["--no-ds-report"]) == 0
    assert "cpu tensors ..... cpu kernel (" in capsys.readouterr().out
    noise_injection._reset_dispatch()
    fresh_dispatch.setenv("DS_DISTILL_FAULT", "noise_op_check")
    assert main(["--no-ds-report"]) == 0
    out = capsys.readouterr().out
    assert "reference: the cpu kernel FELL BACK" in out and "failed its self-check" in out


def test_import_is_lazy():
    """Importing the ops neither imports the op builders (and DeepSpeed with them) nor loads a kernel."""
    code = ("import sys, ds_distill.ops as o; from ds_distill.ops import noise_injection as n; "
            "print('ds_distill.ops.op_builder' in sys.modules, bool(n._ops))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["False", "False"]


def test_jit_cache_follows_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    builder = NoiseInjectionCPUBuilder()
    assert builder.jit_so_path().parent.parent == tmp_path
    assert builder.jit_cache_state() == "missing"


def test_install_time_extensions(monkeypatch):
    from ds_distill.ops.op_builder import NoiseInjectionCUDABuilder, install_time_extensions

    monkeypatch.chdir(REPO)
    # DeepSpeed's builder writes the arch list into os.environ; keep that out of the other tests
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    extensions, cmdclass = install_time_extensions()
    names = [ext.name for ext in extensions]
    assert names[0] == "ds_distill.ops._noise_injection_cpu"
    assert ("ds_distill.ops._noise_injection_cuda" in names) == NoiseInjectionCUDABuilder().is_compatible()
    for ext in extensions:
        assert all(not os.path.isabs(s) and (REPO / s).is_file() for s in ext.sources), ext.sources
    assert "build_ext" in cmdclass


def test_public_api():
    assert set(ops.__all__) >= {"add_noise", "sde_step", "noise_op_backend", "sigma_from_timestep",
                                "add_noise_reference", "sde_step_reference"}


# ---- report --------------------------------------------------------------------------------------------


def test_report_lists_our_ops_and_backends(cpu_op, capsys, fresh_dispatch):
    from ds_distill.report import main

    assert main([]) == 0
    text = capsys.readouterr().out
    assert "DeepSpeed C++/CUDA extension op report" in text
    assert "ds_distill_noise_injection_cpu" in text and "ds_distill_noise_injection_cuda" in text
    assert "nvcc" in text and "ninja" in text and "torch" in text
    assert "noise injection, cpu tensors" in text and "cpu kernel" in text


def test_report_without_cache_or_with_reference_override(capsys, fresh_dispatch, tmp_path):
    from ds_distill.report import main

    fresh_dispatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    noise_injection._reset_dispatch(forget_loaded_ops=True)
    try:
        assert main(["--no-ds-report"]) == 0
        assert "cpu kernel (needs JIT build, ~40 s" in capsys.readouterr().out
        assert not any(tmp_path.iterdir())  # the report built nothing
        fresh_dispatch.setenv(noise_injection.ENV_VAR, "reference")
        assert main(["--no-ds-report"]) == 0
        assert "reference (DS_DISTILL_NOISE_OP=reference)" in capsys.readouterr().out
    finally:
        noise_injection._reset_dispatch(forget_loaded_ops=True)


def test_report_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "ds_distill.report", "--no-ds-report"], capture_output=True,
                         text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "noise injection, cpu tensors" in out.stdout

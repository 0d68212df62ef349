"""Pure-PyTorch reference for the fused noise-injection ops.

These are the definitions the C++ and CUDA kernels are tested against, and what runs when no kernel
is available. Autograd flows through ordinary torch ops. Math is fp32 (fp64 for fp64 inputs); the
order of operations is the one the kernels use, so fp32 results agree to the last bit or so.
"""
from __future__ import annotations

from numbers import Number

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in for inputs of `dtype`: fp64 stays fp64, everything else is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def per_sample(values, batch: int, device: torch.device, name: str) -> Tensor:
    """A python number, 0-d tensor or [B] tensor as a [B] fp32 tensor on `device`."""
    if isinstance(values, Number) and not isinstance(values, bool):
        return torch.full((batch,), float(values), dtype=torch.float32, device=device)
    if not isinstance(values, Tensor):
        raise TypeError(f"{name} must be a python number or a tensor, got {type(values).__name__}")
    if values.numel() == 1:
        return values.reshape(1).to(device=device, dtype=torch.float32).expand(batch).contiguous()
    if values.numel() != batch:
        raise ValueError(f"{name} has {values.numel()} values (shape {tuple(values.shape)}); expected 1 or {batch}")
    return values.reshape(batch).to(device=device, dtype=torch.float32)


def as_timesteps(timesteps, batch: int, device: torch.device) -> Tensor:
    """Timesteps as a [B] tensor on `device`, keeping their dtype (python int -> int64, float -> fp64)."""
    if isinstance(timesteps, Number) and not isinstance(timesteps, bool):
        dtype = torch.int64 if isinstance(timesteps, int) else torch.float64
        return torch.full((batch,), timesteps, dtype=dtype, device=device)
    if not isinstance(timesteps, Tensor):
        raise TypeError(f"timesteps must be a python number or a tensor, got {type(timesteps).__name__}")
    if timesteps.is_complex() or timesteps.dtype == torch.bool:
        raise TypeError(f"timesteps must be a real float or integer tensor, got {timesteps.dtype}")
    timesteps = timesteps.detach()  # not differentiable
    if timesteps.numel() == 1:
        return timesteps.reshape(1).to(device).expand(batch)
    if timesteps.numel() != batch:
        raise ValueError(
            f"timesteps has {timesteps.numel()} values (shape {tuple(timesteps.shape)}); expected 1 or {batch}"
        )
    return timesteps.reshape(batch).to(device)


def sigma_from_timestep(
    timesteps: Tensor,
    shift: float = 1.0,
    sigma_table: Tensor | None = None,
    num_train_timesteps: int = 1000,
) -> Tensor:
    """Per-sample sigma (fp32, same shape as `timesteps`) from the shifted flow-matching schedule or a table.

    Shift: u = clamp(t / num_train_timesteps, 0, 1), sigma = shift*u / (1 + (shift-1)*u).
    Table: sigma = sigma_table[clamp(round(t), 0, len-1)].
    """
    t = torch.as_tensor(timesteps)
    if sigma_table is not None:
        table = sigma_table.to(device=t.device, dtype=torch.float32).reshape(-1)
        if table.numel() == 0:
            raise ValueError("sigma_table is empty")
        index = t.round().long().clamp(0, table.numel() - 1)
        return table[index]
    u = (t.float() / num_train_timesteps).clamp(0.0, 1.0)
    return shift * u / (1 + (shift - 1.0) * u)


def _bcast(values: Tensor, like: Tensor, dtype: torch.dtype) -> Tensor:
    return values.to(dtype).view((-1,) + (1,) * (like.dim() - 1))


def add_noise_reference(
    x0: Tensor,
    eps: Tensor,
    timesteps,
    *,
    shift: float = 1.0,
    sigma_table: Tensor | None = None,
    num_train_timesteps: int = 1000,
) -> Tensor:
    """x_t = (1 - sigma)*x0 + sigma*eps with sigma per sample from `timesteps`; returns x0's dtype."""
    if x0.shape != eps.shape:
        raise ValueError(f"x0 and eps must have the same shape, got {tuple(x0.shape)} and {tuple(eps.shape)}")
    if x0.dim() < 1:
        raise ValueError("x0 must have a batch dimension (rank >= 1)")
    t = as_timesteps(timesteps, x0.shape[0], x0.device)
    sigma = sigma_from_timestep(t, shift, sigma_table, num_train_timesteps)
    cd = compute_dtype(x0.dtype)
    s = _bcast(sigma, x0, cd)
    x_t = (1 - s) * x0.to(cd) + s * eps.to(cd)
    return x_t.to(x0.dtype)


def sde_step_reference(x_t: Tensor, v: Tensor, sigma_t, sigma_next, eps: Tensor | None):
    """(x0_hat, x_next): x0_hat = x_t - sigma_t*v; x_next = (1 - sigma_next)*x0_hat + sigma_next*eps.

    `eps=None` means the last step: returns (x0_hat, None). Outputs have x_t's dtype.
    """
    if x_t.shape != v.shape or (eps is not None and eps.shape != x_t.shape):
        raise ValueError("x_t, v and eps must have the same shape")
    if x_t.dim() < 1:
        raise ValueError("x_t must have a batch dimension (rank >= 1)")
    batch = x_t.shape[0]
    cd = compute_dtype(x_t.dtype)
    st = _bcast(per_sample(sigma_t, batch, x_t.device, "sigma_t"), x_t, cd)
    x0_hat = x_t.to(cd) - st * v.to(cd)
    if eps is None:
        return x0_hat.to(x_t.dtype), None
    sn = _bcast(per_sample(sigma_next, batch, x_t.device, "sigma_next"), x_t, cd)
    x_next = (1 - sn) * x0_hat + sn * eps.to(cd)
    return x0_hat.to(x_t.dtype), x_next.to(x_t.dtype)

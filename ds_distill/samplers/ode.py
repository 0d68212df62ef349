"""The ODE sampling loop: a diffusers flow-matching scheduler's `step()` with classifier-free guidance.

Also the pieces both loops share: the denoiser signature, the guidance combination and the initial noise.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]
"""`(x_t fp32 [B, C, T, H, W], t shifted model timesteps [B], cond [B, L, D]) -> velocity v fp32 [B, C, T, H, W]`."""

StepCallback = Callable[[int, Tensor, Tensor, Optional[Tensor]], None]
"""`(step index, t [B], x0_hat or None, x after the step)`: called once per step (tests, progress bars)."""

NUM_TRAIN_TIMESTEPS = 1000


def initial_noise(shape: Sequence[int], generator: torch.Generator, device: torch.device | str) -> Tensor:
    """Pure noise [B, C, T, H, W] in fp32, drawn on the generator's device (so a seed means the same noise
    whatever device samples), then moved to `device` -- what diffusers' `randn_tensor` does."""
    noise = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device)


def guided_velocity(
    denoiser: Denoiser,
    x: Tensor,
    t: Tensor,
    cond: Tensor,
    uncond: Optional[Tensor],
    guidance_scale: float,
) -> Tensor:
    """v_u + g (v_c - v_u) with separate conditional and unconditional calls (as WanPipeline does);
    a single conditional call when g <= 1. The call count depends only on g, so it is the same on every rank."""
    v = denoiser(x, t, cond)
    if guidance_scale <= 1.0:
        return v
    if uncond is None:
        raise ValueError(f"guidance_scale {guidance_scale} > 1 needs an unconditional embedding")
    v_u = denoiser(x, t, uncond)
    return v_u + guidance_scale * (v - v_u)


def make_flow_scheduler(flow_shift: float, config: Optional[dict] = None):
    """A fresh `FlowMatchEulerDiscreteScheduler` with shift `flow_shift`.

    `config` (a model directory's scheduler_config) is kept when it describes that scheduler class, so a
    directory's own settings (shift_terminal, sigma conversions, ...) carry over; any other class (real Wan
    ships UniPC) is replaced by the plain Euler flow-matching scheduler.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = dict(config or {})
    if config.get("_class_name") == FlowMatchEulerDiscreteScheduler.__name__:
        return FlowMatchEulerDiscreteScheduler.from_config(config, shift=float(flow_shift))
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=float(flow_shift))


@torch.no_grad()
def ode_sample(
    denoiser: Denoiser,
    noise: Tensor,
    cond: Tensor,
    *,
    scheduler,
    num_steps: int = 50,
    raw_timesteps: Optional[Sequence[float]] = None,
    guidance_scale: float = 1.0,
    uncond: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    callback: Optional[StepCallback] = None,
) -> Tensor:
    """Integrate from `noise` with `scheduler.step()` and return the final latents (fp32, model space).

    The schedule is the scheduler's own for `num_steps`, or explicit raw timesteps in (0, 1000] that the
    scheduler shifts (passed as sigmas = raw / 1000). The loop mirrors `diffusers.WanPipeline.__call__`
    (same timesteps, same CFG combination), but keeps the latents in fp32 between steps.
    """
    device = noise.device
    if raw_timesteps is not None:
        sigmas = [float(t) / NUM_TRAIN_TIMESTEPS for t in raw_timesteps]
        scheduler.set_timesteps(sigmas=sigmas, device=device)
    else:
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        scheduler.set_timesteps(num_steps, device=device)
    scheduler.set_begin_index(0)
    x = noise.float()
    batch = x.shape[0]
    for i, t in enumerate(scheduler.timesteps):
        t_b = t.expand(batch)
        v = guided_velocity(denoiser, x, t_b, cond, uncond, guidance_scale).float()
        x = scheduler.step(v, t, x, generator=generator, return_dict=False)[0].float()
        if callback is not None:
            callback(i, t_b, None, x)
    return x

"""The SDE sampling loop: predict x0, re-noise it to the next timestep with fresh noise, repeat.

    x0_hat = x_t - sigma_i * v(x_t, t_i)
    x_{i+1} = (1 - sigma_{i+1}) * x0_hat + sigma_{i+1} * eps_i      (every step but the last)

and the output is the last x0_hat. Few-step students (e.g. distilled with DMD2) are sampled this way on an
explicit list of raw timesteps.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ds_distill.ops import sde_step, sigma_from_timestep
from ds_distill.samplers.ode import NUM_TRAIN_TIMESTEPS, Denoiser, StepCallback, guided_velocity


def check_raw_timesteps(raw_timesteps: Sequence[float]) -> list[float]:
    """Raw timesteps as floats; they must be non-empty, in (0, 1000] and strictly descending."""
    steps = [float(t) for t in raw_timesteps]
    if not steps:
        raise ValueError("the SDE sampler needs at least one timestep")
    if any(not 0 < t <= NUM_TRAIN_TIMESTEPS for t in steps):
        raise ValueError(f"SDE timesteps must lie in (0, {NUM_TRAIN_TIMESTEPS}], got {steps}")
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"SDE timesteps must be strictly descending, got {steps}")
    return steps


def sde_timesteps(raw_timesteps: Sequence[float], flow_shift: float) -> Tensor:
    """Shifted model timesteps (1000 * sigma) [K] of raw timesteps in (0, 1000], as training shifts them."""
    raw = torch.tensor(check_raw_timesteps(raw_timesteps), dtype=torch.float32)
    return sigma_from_timestep(raw, shift=float(flow_shift)) * NUM_TRAIN_TIMESTEPS


def even_raw_timesteps(num_steps: int) -> list[float]:
    """`num_steps` evenly spaced raw timesteps from 1000 down (1000, 750, 500, 250 for 4): the SDE schedule
    used when a caller gives a step count but no explicit timesteps."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    return [NUM_TRAIN_TIMESTEPS * (1 - i / num_steps) for i in range(num_steps)]


@torch.no_grad()
def sde_sample(
    denoiser: Denoiser,
    noise: Tensor,
    cond: Tensor,
    *,
    raw_timesteps: Sequence[float],
    flow_shift: float,
    generator: torch.Generator,
    guidance_scale: float = 1.0,
    uncond: Optional[Tensor] = None,
    callback: Optional[StepCallback] = None,
) -> Tensor:
    """Run the SDE loop from pure `noise` and return the last x0_hat (fp32, model space).

    The fresh noise of step i is drawn from `generator` (on its own device, then moved), after whatever the
    caller drew for `noise`: one seed reproduces the whole trajectory.
    """
    ts = sde_timesteps(raw_timesteps, flow_shift).to(noise.device)
    x = noise.float()
    batch = x.shape[0]
    x0_hat = x
    for i in range(len(ts)):
        t = ts[i].expand(batch)
        v = guided_velocity(denoiser, x, t, cond, uncond, guidance_scale).float()
        sigma = t / NUM_TRAIN_TIMESTEPS
        if i == len(ts) - 1:
            x0_hat, _ = sde_step(x, v, sigma, 0.0, None)
            x = x0_hat
        else:
            eps = torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32)
            sigma_next = ts[i + 1].expand(batch) / NUM_TRAIN_TIMESTEPS
            x0_hat, x = sde_step(x, v, sigma, sigma_next, eps.to(x.device))
        if callback is not None:
            callback(i, t, x0_hat, x)
    return x0_hat

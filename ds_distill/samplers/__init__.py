"""Sampling loops, chosen by `pipeline_config.sampler_kind` (or a method's ValidationRequest):

- `ode`: a diffusers flow-matching scheduler's `step()` with classifier-free guidance (what WanPipeline runs);
- `sde`: x0 prediction, re-noised to the next of an explicit list of raw timesteps (few-step students).

Both take a denoiser callable `(x_t, t, cond) -> v` (fp32 latents, shifted model timesteps [B]), so one loop
serves a ZeRO-3 role through its adapter and a plain `nn.Module` alike. Nothing here knows about methods.
"""
from __future__ import annotations

from typing import Callable, Literal, Optional, Sequence

import torch
from torch import Tensor

from ds_distill.samplers.ode import (
    Denoiser,
    StepCallback,
    guided_velocity,
    initial_noise,
    make_flow_scheduler,
    ode_sample,
)
from ds_distill.samplers.sde import check_raw_timesteps, even_raw_timesteps, sde_sample, sde_timesteps

SamplerKind = Literal["ode", "sde"]
SAMPLER_KINDS: tuple[str, ...] = ("ode", "sde")

__all__ = [
    "SAMPLER_KINDS",
    "Denoiser",
    "SamplerKind",
    "StepCallback",
    "check_raw_timesteps",
    "denoiser_from_module",
    "even_raw_timesteps",
    "guided_velocity",
    "initial_noise",
    "make_flow_scheduler",
    "ode_sample",
    "sample_latents",
    "sde_sample",
    "sde_timesteps",
]


def sample_latents(
    kind: str,
    denoiser: Denoiser,
    noise: Tensor,
    cond: Tensor,
    *,
    flow_shift: float,
    generator: torch.Generator,
    num_steps: int = 50,
    raw_timesteps: Optional[Sequence[float]] = None,
    guidance_scale: float = 1.0,
    uncond: Optional[Tensor] = None,
    scheduler_config: Optional[dict] = None,
    callback: Optional[StepCallback] = None,
) -> Tensor:
    """Run the `kind` loop from `noise`; returns final latents in model (normalised) space, fp32.

    ode: the scheduler's schedule for `num_steps`, or `raw_timesteps` when given (shifted by the scheduler).
    sde: `raw_timesteps` shifted by `flow_shift`, or `num_steps` evenly spaced raw timesteps when not given.
    """
    if kind == "ode":
        return ode_sample(
            denoiser, noise, cond,
            scheduler=make_flow_scheduler(flow_shift, scheduler_config),
            num_steps=num_steps, raw_timesteps=raw_timesteps,
            guidance_scale=guidance_scale, uncond=uncond, generator=generator, callback=callback,
        )
    if kind == "sde":
        steps = list(raw_timesteps) if raw_timesteps is not None else even_raw_timesteps(num_steps)
        return sde_sample(
            denoiser, noise, cond,
            raw_timesteps=steps, flow_shift=flow_shift, generator=generator,
            guidance_scale=guidance_scale, uncond=uncond, callback=callback,
        )
    raise ValueError(f"unknown sampler kind {kind!r} (available: {', '.join(SAMPLER_KINDS)})")


def denoiser_from_module(module: torch.nn.Module, dtype: Optional[torch.dtype] = None,
                         timestep_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None) -> Denoiser:
    """A denoiser over a plain diffusers transformer (no DeepSpeed): inputs cast to its dtype, v back in fp32.
    `timestep_fn(t, x)` makes the module's `timestep` input from t [B] and the latents (the family's
    `timestep_fn`, e.g. one timestep per token); without it the module gets t."""
    dtype = dtype or next(module.parameters()).dtype

    def denoise(x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        t = t.float()
        out = module(hidden_states=x.to(dtype), timestep=t if timestep_fn is None else timestep_fn(t, x),
                     encoder_hidden_states=cond.to(dtype), return_dict=False)[0]
        return out.float()

    return denoise

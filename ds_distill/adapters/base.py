"""The operation-centric primitives a method may use; families implement them, methods depend on this Protocol."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from ds_distill.roles import RoleHandle


@dataclass
class TrainingBatch:
    """A micro-batch in model space: normalised latents (or None), text conditions, global sample ids."""

    latents: torch.Tensor | None
    """Normalised VAE latents [B, C, T, H, W] (fp32), or None when the batch is text only."""
    latent_shape: tuple[int, ...]
    """Per-sample latent shape [C, T, H, W] (also for text-only batches)."""
    cond: torch.Tensor
    """Text condition [B, L, D] in the compute dtype."""
    cond_mask: torch.Tensor
    """Which text tokens are real [B, L]."""
    uncond: torch.Tensor
    """Unconditional text condition [B, L, D] (encoded negative prompt, or zeros)."""
    sample_ids: torch.Tensor
    """Global sample ids [B]: keys for per-sample randomness."""
    captions: list[str] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return int(self.sample_ids.numel())


class DiffusionAdapter(Protocol):
    """What methods call; nothing here reads method knobs."""

    device: torch.device

    def prepare_batch(self, raw: dict, latents_source: Literal["data", "zeros"]) -> TrainingBatch:
        """Collated loader output -> TrainingBatch (normalises latents; `zeros` skips them)."""

    def shift_timesteps(self, t_raw: torch.Tensor) -> torch.Tensor:
        """Raw timesteps in [0, 1000] -> the shifted timesteps the model sees (1000 * sigma)."""

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise level of shifted timesteps (t / 1000), fp32 [B]."""

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - sigma) x0 + sigma eps (fused op)."""

    def predict_noise(self, role: RoleHandle, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The role's velocity prediction v ~ eps - x0, fp32."""

    def predict_x0(self, role: RoleHandle, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x0_hat = x_t - sigma v, fp32."""

    def feature_dim(self, module: torch.nn.Module) -> int:
        """Width of the hidden states `predict_features` returns for this role's module."""

    def num_blocks(self, module: torch.nn.Module) -> int:
        """How many blocks a feature tap may name (indices 0 .. num_blocks - 1)."""

    def predict_noise_and_features(self, role: RoleHandle, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                                   blocks: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One forward: velocity (fp32) and the hidden states [B, N, D] of the chosen blocks (the family's forward
        hooks). Put everything one loss needs from a role into this one call (ZeRO-3 leaf modules reduce their
        gradients once per call)."""

    def sde_step(self, x_t, v, t, t_next, eps):
        """(x0_hat, re-noised input at t_next) in one fused pass; eps None on the last step."""

    def backward(self, role: RoleHandle, loss: torch.Tensor) -> None:
        """Backward through the role's own engine."""

"""DMD2's diffusion-GAN term: a small discriminator head on hidden states of chosen critic blocks.

Real latents and student samples are noised at the same timestep; the critic runs on them with forward hooks on
the chosen blocks (the family's feature taps), and the head turns those hidden states into one logit per sample.
The head is a submodule of the critic (`GAN_HEAD`), so the critic's DeepSpeed engine owns and steps it.

Heads (`gan_head`):
- `mean`: per tapped block, LayerNorm (no affine) then the mean over tokens; the block vectors are concatenated
  and an MLP (Linear -> SiLU -> Linear) gives the logit.
- `attention`: per tapped block, one learned query attends over the normalised tokens (keys a Linear of the tokens,
  values the tokens); the pooled vectors go through the same MLP.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

GAN_HEAD = "gan_head"
"""Attribute name of the head on the critic's module."""


class GanHead(torch.nn.Module):
    """Hidden states of `num_blocks` blocks ([B, N, dim] each) -> one logit per sample [B] (fp32)."""

    def __init__(self, dim: int, num_blocks: int, kind: Literal["mean", "attention"] = "mean", hidden: int = 256):
        super().__init__()
        self.kind = kind
        self.dim = dim
        if kind == "attention":
            self.queries = torch.nn.Parameter(torch.randn(num_blocks, dim) * dim ** -0.5)
            self.keys = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(num_blocks))
        self.fc1 = torch.nn.Linear(num_blocks * dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, 1)

    def pool(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """[B, N, dim] -> [B, dim] for tapped block i."""
        h = F.layer_norm(h, (self.dim,))
        if self.kind == "mean":
            return h.mean(dim=1)
        scores = torch.einsum("bnd,d->bn", self.keys[i](h), self.queries[i]) * self.dim ** -0.5
        return torch.einsum("bn,bnd->bd", scores.softmax(dim=1), h)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        dtype = self.fc1.weight.dtype
        pooled = torch.cat([self.pool(i, f.to(dtype)) for i, f in enumerate(features)], dim=1)
        return self.fc2(F.silu(self.fc1(pooled))).squeeze(1).float()


def critic_gan_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    """mean(softplus(D(fake)) + softplus(-D(real))): the critic learns to tell noised data from noised samples."""
    return (F.softplus(logits_fake.float()) + F.softplus(-logits_real.float())).mean()


def generator_gan_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """mean(softplus(-D(fake))): the student makes samples the head takes for data (non-saturating loss)."""
    return F.softplus(-logits_fake.float()).mean()

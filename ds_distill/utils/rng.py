"""Randomness as a pure function of (seed, stream, index): same on every rank, reproducible on resume.

Per-sample noise is keyed by the sample's global index, so one rank with batch 2 draws exactly what two ranks
with batch 1 draw between them; control-flow draws are keyed by the step, so every rank takes the same branch
(ZeRO-3 needs the same collectives everywhere).
"""
from __future__ import annotations

import torch

_MASK = (1 << 64) - 1

# Named streams keep independent draws from colliding.
STREAMS = {
    "noise": 1,
    "timestep": 2,
    "cfg_drop": 3,
    "rollout_noise": 4,
    "score_noise": 5,
    "score_timestep": 6,
    "exit_index": 7,
    "critic_noise": 8,
    "critic_timestep": 9,
    "critic_rollout": 10,
    "validation": 11,
}


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (order matters)."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK))
    return h & ((1 << 63) - 1)


def generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from `parts`."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def _stream(name: str) -> int:
    return STREAMS[name]


def per_sample_randn(shape, sample_ids: torch.Tensor, seed: int, stream: str, extra: int = 0) -> torch.Tensor:
    """Standard normal noise [B, *shape]; row i depends only on (seed, stream, extra, sample_ids[i])."""
    rows = [torch.randn(tuple(shape), generator=generator(seed, _stream(stream), extra, int(i))) for i in sample_ids]
    return torch.stack(rows)


def per_sample_rand(sample_ids: torch.Tensor, seed: int, stream: str, extra: int = 0) -> torch.Tensor:
    """Uniform [0, 1) per sample [B]."""
    return torch.stack(
        [torch.rand((), generator=generator(seed, _stream(stream), extra, int(i))) for i in sample_ids]
    )


def per_sample_normal(sample_ids: torch.Tensor, seed: int, stream: str, extra: int = 0) -> torch.Tensor:
    """Standard normal scalar per sample [B]."""
    return torch.stack(
        [torch.randn((), generator=generator(seed, _stream(stream), extra, int(i))) for i in sample_ids]
    )


def shared_randint(high: int, seed: int, stream: str, step: int) -> int:
    """An integer in [0, high) that every rank draws identically at this step."""
    return int(torch.randint(high, (1,), generator=generator(seed, _stream(stream), step)))

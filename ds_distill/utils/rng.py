"""Randomness as a pure function of (seed, stream, index): same on every rank, reproducible on resume.

Per-sample noise is keyed by the sample's global index, so one rank with batch 2 draws exactly what two ranks
with batch 1 draw between them; control-flow draws are keyed by the step, so every rank takes the same branch
(ZeRO-3 needs the same collectives everywhere).

`per_sample_randn(..., device=...)` draws on that device: one generator per device, reseeded per sample, each
row written in place (no host tensor, no copy). CPU rows are the numbers CPU generators have always given. On
an accelerator the rows come from its own generator (Philox on CUDA): a pure function of (seed, stream, extra,
sample id, shape) on a given GPU model, but not the CPU's numbers.
"""
from __future__ import annotations

import threading

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


_local = threading.local()  # per thread: device -> one generator reseeded for every draw


def _seeded(device: torch.device, seed: int) -> torch.Generator:
    """This thread's generator for `device`, reseeded (a seeded generator is a pure function of its seed)."""
    cache = getattr(_local, "generators", None)
    if cache is None:
        cache = _local.generators = {}
    g = cache.get(device)
    if g is None:
        g = cache[device] = torch.Generator(device=device)
    return g.manual_seed(seed)


def _device(device) -> torch.device:
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda" and dev.index is None:  # one cache key per physical device
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _stream(name: str) -> int:
    return STREAMS[name]


def _ids(sample_ids) -> list[int]:
    return sample_ids.tolist() if torch.is_tensor(sample_ids) else [int(i) for i in sample_ids]


def per_sample_randn(shape, sample_ids: torch.Tensor, seed: int, stream: str, extra: int = 0,
                     device=None) -> torch.Tensor:
    """Standard normal fp32 noise [B, *shape] on `device` (default CPU); row i depends only on
    (seed, stream, extra, sample_ids[i]) (and the device type)."""
    dev, s = _device(device), _stream(stream)
    ids = _ids(sample_ids)
    out = torch.empty((len(ids), *shape), dtype=torch.float32, device=dev)
    for row, i in zip(out, ids):
        row.normal_(generator=_seeded(dev, derive_seed(seed, s, extra, i)))
    return out


def _scalars(sample_ids, seed: int, stream: str, extra: int, normal: bool) -> torch.Tensor:
    s, cpu = _stream(stream), torch.device("cpu")
    ids = _ids(sample_ids)
    out = torch.empty(len(ids), dtype=torch.float32)
    for j, i in enumerate(ids):
        g = _seeded(cpu, derive_seed(seed, s, extra, i))
        out[j : j + 1].normal_(generator=g) if normal else out[j : j + 1].uniform_(generator=g)
    return out


def per_sample_rand(sample_ids: torch.Tensor, seed: int, stream: str, extra: int = 0) -> torch.Tensor:
    """Uniform [0, 1) per sample [B] (CPU)."""
    return _scalars(sample_ids, seed, stream, extra, normal=False)


def per_sample_normal(sample_ids: torch.Tensor, seed: int, stream: str, extra: int = 0) -> torch.Tensor:
    """Standard normal scalar per sample [B] (CPU)."""
    return _scalars(sample_ids, seed, stream, extra, normal=True)


def shared_randint(high: int, seed: int, stream: str, step: int) -> int:
    """An integer in [0, high) that every rank draws identically at this step."""
    return int(torch.randint(high, (1,), generator=generator(seed, _stream(stream), step)))

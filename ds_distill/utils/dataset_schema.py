"""The preprocessed parquet schema (FastVideo T2V compatible) and tensor <-> bytes helpers."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

T2V_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("vae_latent_bytes", pa.binary()),
        pa.field("vae_latent_shape", pa.list_(pa.int64())),
        pa.field("vae_latent_dtype", pa.string()),
        pa.field("text_embedding_bytes", pa.binary()),
        pa.field("text_embedding_shape", pa.list_(pa.int64())),
        pa.field("text_embedding_dtype", pa.string()),
        pa.field("file_name", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("media_type", pa.string()),
        pa.field("width", pa.int64()),
        pa.field("height", pa.int64()),
        pa.field("num_frames", pa.int64()),
        pa.field("duration_sec", pa.float64()),
        pa.field("fps", pa.float64()),
    ]
)
"""Latent + text embedding rows: what finetuning and `rollout_mode: data` read."""

TEXT_ONLY_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("text_embedding_bytes", pa.binary()),
        pa.field("text_embedding_shape", pa.list_(pa.int64())),
        pa.field("text_embedding_dtype", pa.string()),
        pa.field("caption", pa.string()),
    ]
)
"""Text-only rows: enough for data-free DMD (`rollout_mode: simulate`)."""

LATENT_COLUMNS = ("vae_latent_bytes", "vae_latent_shape", "vae_latent_dtype")
TEXT_COLUMNS = ("text_embedding_bytes", "text_embedding_shape", "text_embedding_dtype")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named by a parquet `*_dtype` column ('float32', 'bfloat16', 'torch.float16', ...)."""
    key = name.strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r} (expected one of float32, float16, bfloat16)")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """The name written into a `*_dtype` column."""
    return str(dtype).removeprefix("torch.")


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor (bf16 included, which numpy cannot hold)."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def tensor_from_bytes(data: bytes, shape, dtype_str: str) -> torch.Tensor:
    """Inverse of tensor_to_bytes; raises ValueError when the byte count does not match shape and dtype."""
    dtype = torch_dtype(dtype_str)
    shape = [int(s) for s in shape]
    count = int(np.prod(shape)) if shape else 1
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) != count * itemsize:
        raise ValueError(f"{len(data)} bytes do not hold shape {shape} of {dtype_str} ({count * itemsize} bytes)")
    if dtype == torch.bfloat16:
        arr = np.frombuffer(data, dtype=np.int16).copy()
        return torch.from_numpy(arr).view(torch.bfloat16).reshape(shape)
    np_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}[dtype]
    return torch.from_numpy(np.frombuffer(data, dtype=np_dtype).copy()).reshape(shape)

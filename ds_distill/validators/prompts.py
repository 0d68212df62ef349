"""Validation prompts: a JSON file of captions or a parquet file of precomputed text embeddings.

JSON: {"data": [{"caption": ..., "num_inference_steps": ..., "height": ..., "width": ..., "num_frames": ...}]}
(only `caption` is required; other keys of an entry are ignored, so FastVideo prompt files load as they are).
Parquet: the text-only dataset schema (`text_embedding_bytes/_shape/_dtype`, `caption`), optionally with
`height`, `width`, `num_frames` columns; a directory of parquet files is read as one table.

Every problem is one DataError line naming the file and the entry.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ds_distill.errors import DataError

JSON_HINT = '{"data": [{"caption": "...", "height": 480, "width": 832, "num_frames": 81}, ...]}'
EMBEDDING_COLUMNS = ("text_embedding_bytes", "text_embedding_shape", "text_embedding_dtype")
SIZE_KEYS = ("height", "width", "num_frames", "num_inference_steps")


@dataclass
class ValidationPrompt:
    """One validation video: its caption, optional size and step count, and its text embedding once known."""

    caption: str
    where: str
    """The entry in its file, for error messages (`data[2]`, `row 5`)."""
    height: Optional[int] = None
    width: Optional[int] = None
    num_frames: Optional[int] = None
    num_inference_steps: Optional[int] = None
    """Steps the file asks for; the sample CLI honours it, training validation uses the method's request."""
    embedding: Optional[torch.Tensor] = None
    """Text condition [L, D] (fp32, unpadded) from the parquet file or the family's text encoder."""


def load_prompts(path: str | Path) -> list[ValidationPrompt]:
    """Read a prompts file (.json, or .parquet / a folder of them)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: validation prompts file not found")
    if path.is_dir() or path.suffix == ".parquet":
        return load_parquet_prompts(path)
    if path.suffix == ".json":
        return load_json_prompts(path)
    raise DataError(f"{path}: validation prompts must be a .json file ({JSON_HINT}) or a .parquet file with "
                    f"text embeddings")


def _positive_int(value, path: Path, key: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{path}: {key}: expected a positive integer, got {value!r}")
    return value


def load_json_prompts(path: Path) -> list[ValidationPrompt]:
    """Captions (and optional sizes) from a JSON prompts file."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); expected {JSON_HINT}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the prompts file ({type(exc).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(f"{path}: expected an object with a `data` list: {JSON_HINT}")
    if not data["data"]:
        raise DataError(f"{path}: data: the list of prompts is empty")
    prompts = []
    for i, entry in enumerate(data["data"]):
        where = f"data[{i}]"
        if not isinstance(entry, dict):
            raise DataError(f"{path}: {where}: expected an object with a `caption`, got {type(entry).__name__}")
        caption = entry.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(f"{path}: {where}.caption: expected a non-empty string, got {caption!r}")
        sizes = {k: _positive_int(entry.get(k), path, f"{where}.{k}") for k in SIZE_KEYS}
        prompts.append(ValidationPrompt(caption=caption, where=where, **sizes))
    return prompts


def load_parquet_prompts(path: Path) -> list[ValidationPrompt]:
    """Captions and precomputed text embeddings from parquet (the text-only dataset schema)."""
    import pyarrow.dataset as ds

    from ds_distill.utils.dataset_schema import tensor_from_bytes

    try:
        table = ds.dataset(str(path), format="parquet").to_table()
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable parquet file or folder ({type(exc).__name__})") from None
    need = EMBEDDING_COLUMNS + ("caption",)
    missing = [c for c in need if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (validation parquet needs "
                        f"{', '.join(need)})")
    if table.num_rows == 0:
        raise DataError(f"{path}: no rows")
    columns = {c: table.column(c).to_pylist() for c in need}
    sizes = {k: table.column(k).to_pylist() if k in table.column_names else [None] * table.num_rows
             for k in SIZE_KEYS}
    prompts = []
    for i in range(table.num_rows):
        where = f"row {i}"
        try:
            emb = tensor_from_bytes(columns["text_embedding_bytes"][i], columns["text_embedding_shape"][i],
                                    columns["text_embedding_dtype"][i])
        except (ValueError, TypeError) as exc:
            raise DataError(f"{path}: {where}: text_embedding: {exc}") from None
        if emb.dim() != 2:
            raise DataError(f"{path}: {where}: text_embedding_shape must be [L, D], got {list(emb.shape)}")
        caption = columns["caption"][i] or ""
        size = {k: _positive_int(sizes[k][i], path, f"{where}.{k}") for k in SIZE_KEYS}
        prompts.append(ValidationPrompt(caption=caption, where=where, embedding=emb.float(), **size))
    return prompts


def check_text_dim(prompts: list[ValidationPrompt], dim: int, path: str | Path) -> None:
    """Precomputed embeddings must have the model's text width."""
    for p in prompts:
        if p.embedding is not None and p.embedding.shape[-1] != dim:
            raise DataError(f"{path}: {p.where}: text embedding has width {p.embedding.shape[-1]}, the model "
                            f"expects {dim}")


def pad_embedding(embedding: torch.Tensor, text_len: int) -> torch.Tensor:
    """[L, D] -> [text_len, D]: cropped, or zero-padded as WanPipeline pads (and as training batches are)."""
    out = embedding.new_zeros(text_len, embedding.shape[-1])
    n = min(text_len, embedding.shape[0])
    out[:n] = embedding[:n]
    return out


def slugify(caption: str, max_len: int = 40) -> str:
    """A file-name-safe short form of a caption (`a-red-ball-bouncing`)."""
    slug = re.sub(r"[^a-z0-9]+", "-", caption.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "prompt"

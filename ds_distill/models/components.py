"""Family-neutral model loading: Diffusers directories, and streaming safetensors into ZeRO-3 partitions."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ds_distill.errors import RecipeError, UserError

WEIGHT_INDEX_SUFFIX = ".safetensors.index.json"


@dataclass
class ModelComponents:
    """What a role's model directory holds, read without loading any weights."""

    path: Path
    model_index: dict
    transformer_config: dict
    vae_config: dict = field(default_factory=dict)
    scheduler_config: dict = field(default_factory=dict)


def resolve_model_dir(path: str, source: str, key: str) -> Path:
    """A local Diffusers directory, or a hub id fetched when online; anything else is a one-line error."""
    p = Path(os.path.expanduser(path))
    if not p.is_absolute() and not p.exists():
        beside = Path(source).parent / p
        if beside.exists():
            p = beside
    if p.is_dir():
        if not (p / "transformer" / "config.json").is_file() and not (p / "config.json").is_file():
            raise RecipeError(f"{source}: {key}: {p} is not a Diffusers model directory (no transformer/config.json)")
        return p
    if p.exists():
        raise RecipeError(f"{source}: {key}: {p} is a file; expected a Diffusers model directory")
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    offline = os.environ.get("HF_HUB_OFFLINE", "0") == "1"
    if looks_like_hub_id and not offline:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(path))
        except Exception as exc:  # network, auth, missing repo: all the same to the user
            raise RecipeError(
                f"{source}: {key}: {path!r} is not a local directory and could not be fetched from the hub "
                f"({type(exc).__name__}); download it first and set the path to the folder"
            ) from None
    raise RecipeError(f"{source}: {key}: model directory {path!r} does not exist")


def transformer_dir(model_dir: Path) -> Path:
    """The folder holding the transformer's config and weights (pipeline dir or a bare model dir)."""
    sub = model_dir / "transformer"
    return sub if (sub / "config.json").is_file() else model_dir


def read_components(model_dir: Path) -> ModelComponents:
    """Configs of a Diffusers pipeline directory (or a bare transformer directory)."""

    def read(p: Path) -> dict:
        return json.loads(p.read_text()) if p.is_file() else {}

    return ModelComponents(
        path=model_dir,
        model_index=read(model_dir / "model_index.json"),
        transformer_config=read(transformer_dir(model_dir) / "config.json"),
        vae_config=read(model_dir / "vae" / "config.json"),
        scheduler_config=read(model_dir / "scheduler" / "scheduler_config.json"),
    )


def weight_files(folder: Path) -> dict[str, list[str]]:
    """Map safetensors file -> tensor names for a model folder (single file or sharded with an index)."""
    from safetensors import safe_open

    index = sorted(folder.glob(f"*{WEIGHT_INDEX_SUFFIX}"))
    if index:
        weight_map = json.loads(index[0].read_text())["weight_map"]
        files: dict[str, list[str]] = defaultdict(list)
        for name, fname in weight_map.items():
            files[str(folder / fname)].append(name)
        return dict(files)
    singles = sorted(folder.glob("*.safetensors"))
    if not singles:
        raise UserError(f"{folder}: no .safetensors weights found (pickled .bin weights are not loaded)")
    out = {}
    for f in singles:
        with safe_open(str(f), "pt") as handle:
            out[str(f)] = list(handle.keys())
    return out


def _group_key(name: str) -> str:
    """Parameters are gathered per top-level block (`blocks.3`, `condition_embedder`), bounding peak memory."""
    parts = name.split(".")
    if len(parts) > 2 and parts[1].isdigit():
        return ".".join(parts[:2])
    return parts[0]


def load_weights_streaming(module: torch.nn.Module, folder: Path, rank: int) -> None:
    """Copy safetensors weights into a (possibly ZeRO-3 partitioned) module, one block at a time.

    Every rank takes part in each gather; only rank 0 reads tensors from disk, so host memory per node stays
    near one full partitioned copy plus one gathered block, whatever the number of ranks.
    """
    import deepspeed
    from safetensors import safe_open

    params = dict(module.named_parameters())
    buffers = {n: b for n, b in module.named_buffers() if n in module.state_dict()}
    files = weight_files(folder)
    seen: set[str] = set()
    unexpected = [n for names in files.values() for n in names if n not in params and n not in buffers]
    if unexpected:
        raise UserError(f"{folder}: weight {unexpected[0]!r} does not belong to this model ({len(unexpected)} such)")
    for fname, names in files.items():
        groups: dict[str, list[str]] = defaultdict(list)
        for n in names:
            groups[_group_key(n)].append(n)
        handle = safe_open(fname, "pt") if rank == 0 else None
        for group in groups.values():
            group_params = [params[n] for n in group if n in params]
            zero_params = [p for p in group_params if hasattr(p, "ds_id")]
            ctx = deepspeed.zero.GatheredParameters(zero_params, modifier_rank=0) if zero_params else _null()
            with ctx:
                if rank == 0:
                    with torch.no_grad():
                        for n in group:
                            target = params.get(n, buffers.get(n))
                            tensor = handle.get_tensor(n)
                            if tuple(tensor.shape) != tuple(target.shape):
                                raise UserError(
                                    f"{fname}: {n} has shape {list(tensor.shape)}, the model expects "
                                    f"{list(target.shape)} (config.json and weights disagree)"
                                )
                            target.data.copy_(tensor.to(target.dtype))
            seen.update(group)
    missing = [n for n in params if n not in seen]
    if missing:
        raise UserError(f"{folder}: weights for {missing[0]!r} are missing ({len(missing)} parameters)")
    # Non-partitioned tensors (buffers, parameters of a module built outside zero.Init) were written on rank 0 only.
    from ds_distill.engines import broadcast_tensors

    broadcast_tensors(list(buffers.values()) + [p for p in params.values() if not hasattr(p, "ds_id")], src=0)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

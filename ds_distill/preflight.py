"""Preflight: everything a user can get wrong is found before any process group or engine exists.

Role folders, DeepSpeed templates, data (readable, schema-valid, first row of every file decodable, shapes that
fit the model), validation prompts, the output folder (writable, room for a checkpoint), and the checkpoint to
resume (complete, same method and roles). Each problem is one UserError line naming the file and the key.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ds_distill.errors import CheckpointError, DataError, RecipeError


@dataclass
class Preflight:
    """What preflight found and the run reuses."""

    dataset: object
    components: dict
    resume_path: Path | None
    resume_state: dict | None


def check_output_dir(path: Path, source: str, need_bytes: int) -> None:
    """The output folder must be creatable, writable, and have room for one more checkpoint."""
    if path.exists() and not path.is_dir():
        raise RecipeError(f"{source}: training.output_dir: {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise RecipeError(f"{source}: training.output_dir: {path} is not writable ({exc.strerror})") from None
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise RecipeError(f"{source}: training.output_dir: {path} has {free / 2**30:.2f} GiB free, a checkpoint "
                          f"needs about {need_bytes / 2**30:.2f} GiB; free space or choose another folder")


def checkpoint_bytes(components: dict, recipe, ema: bool) -> int:
    """A checkpoint's size: per trainable role fp32 master + two Adam moments + module weights (+ EMA)."""
    total = 0
    for name, spec in recipe.roles.items():
        if not spec.trainable:
            continue
        numel = transformer_numel(components[name].transformer_config)
        per = 4 * 3 + (2 if recipe.training.mixed_precision == "bf16" else 4) + (4 if ema and name == "student" else 0)
        total += numel * per
    return int(total * 1.1)


def transformer_numel(config: dict) -> int:
    """Parameter count of a Wan transformer from its config (no weights loaded)."""
    import torch
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    return sum(p.numel() for p in model.parameters())


def check_data_fits_model(dataset, components: dict, recipe, need_latents: bool) -> None:
    """Every file's first row decodes, and its latent/text shapes fit the student's transformer."""
    cfg = components["student" if "student" in components else next(iter(components))].transformer_config
    src = recipe.training.data_path
    channels, text_dim = cfg.get("in_channels"), cfg.get("text_dim")
    patch = cfg.get("patch_size", [1, 2, 2])
    for i, start in enumerate(dataset._starts):
        path = dataset.files[i].path
        row = dataset[start]
        d = row["text_embedding"].shape[-1]
        if text_dim is not None and d != text_dim:
            raise DataError(f"{path}: text_embedding_shape: embeddings have dim {d}, the model's text_dim is "
                            f"{text_dim} (data made by another text encoder?)")
        if need_latents:
            shape = list(row["vae_latent"].shape)
            if len(shape) != 4:
                raise DataError(f"{path}: vae_latent_shape: expected [C, T, H, W], got {shape}")
            if channels is not None and shape[0] != channels:
                raise DataError(f"{path}: vae_latent_shape: latents have {shape[0]} channels, the model expects "
                                f"{channels} (data made by another VAE?)")
            for dim, p, name in zip(shape[1:], patch, ("T", "H", "W")):
                if dim % p:
                    raise DataError(f"{path}: vae_latent_shape: {name}={dim} is not a multiple of the patch size {p}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    global_batch = recipe.training.train_batch_size * world
    if len(dataset) < global_batch:
        raise DataError(f"{src}: the dataset has {len(dataset)} rows, fewer than one global batch "
                        f"({recipe.training.train_batch_size} per rank x {world} ranks); lower train_batch_size")


def check_resume(output_dir: Path, resume: str, recipe) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume: complete, and written by this method for these trainable roles."""
    import json

    from ds_distill.utils import checkpoint as ckpt

    path = ckpt.find_resume_checkpoint(output_dir, resume)
    if path is None:
        return None, None
    try:
        state = ckpt.read_state(path)
    except (json.JSONDecodeError, OSError) as exc:
        raise CheckpointError(f"{path}/{ckpt.STATE_FILE}: unreadable trainer state ({exc})") from None
    want = sorted(n for n, s in recipe.roles.items() if s.trainable)
    have = sorted(state.get("roles", []))
    if state.get("method") != recipe.recipe.method:
        raise CheckpointError(f"{path}: --resume: written by method {state.get('method')!r}, the recipe runs "
                              f"{recipe.recipe.method!r}")
    if want != have:
        raise CheckpointError(f"{path}: --resume: holds roles {have}, the recipe trains {want}")
    for role in have:
        if not any((path / role).glob("*_model_states.pt")):
            raise CheckpointError(f"{path}/{role}: --resume: no DeepSpeed model states (incomplete copy?)")
    return path, state


def run(recipe, checked, resume: str | None) -> Preflight:
    """All checks, in the order a user would fix them."""
    from ds_distill.dispatch import get_family
    from ds_distill.engines import load_template
    from ds_distill.utils.config import resolve_path
    from ds_distill.utils.dataloader import ParquetDataset

    src, t = recipe.source, recipe.training
    components = {}
    for name, spec in recipe.roles.items():
        components[name] = get_family(spec.family, src)().components(spec.path, src, f"roles.{name}.path")
        default = t.ds_config if spec.trainable else t.ds_config_inference
        load_template(spec.ds_config or default, src, f"roles.{name}.ds_config" if spec.ds_config else
                      ("training.ds_config" if spec.trainable else "training.ds_config_inference"))
    main_role = "student" if "student" in components else next(iter(components))
    get_family(recipe.recipe.family, src)().check_unconditional(components[main_role], t, src)
    need_latents = checked.method_cls.needs_latents(checked.method_config)
    dataset = ParquetDataset(t.data_path, t.text_len, need_latents)
    check_data_fits_model(dataset, components, recipe, need_latents)
    if t.log_validation:
        from ds_distill.validators.prompts import load_prompts

        load_prompts(resolve_path(t.validation_dataset_file, recipe))
    ema = bool(getattr(checked.method_config, "ema_decay", 0))
    output_dir = Path(t.output_dir)
    check_output_dir(output_dir, src, checkpoint_bytes(components, recipe, ema))
    resume_path, state = check_resume(output_dir, resume, recipe) if resume else (None, None)
    return Preflight(dataset=dataset, components=components, resume_path=resume_path, resume_state=state)


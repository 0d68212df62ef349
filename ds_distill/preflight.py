"""Preflight: everything a user can get wrong is found before any process group or engine exists, and before
anything is written to the output folder.

Role folders (config JSON, safetensors headers and shard index complete, weights that fit the config), DeepSpeed
templates, sizes the method generates at, data (readable, schema-valid, a sample of rows decoded and finite, latent
shapes consistent), validation prompts, the output folder (writable, room for a checkpoint, not held by another
run, empty unless resuming) and the checkpoint to resume (complete, same method, roles and parameter shapes).
Each problem is one UserError line naming the file and the key. Nothing here writes.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from ds_distill.errors import CheckpointError, DataError, RecipeError, UserError

SAMPLE_ROWS = 32
"""Rows decoded per dataset beyond the first row of every file (drawn over all files, seeded)."""


@dataclass
class Preflight:
    """What preflight found and the run reuses."""

    dataset: object
    components: dict
    resume_path: Path | None
    resume_state: dict | None
    seconds: float = 0.0
    """How long the checks took (reported next to the start-up time)."""
    import_seconds: float = 0.0
    """Importing what the run loads anyway (diffusers, DeepSpeed), done first and not counted in `seconds`."""


# ----------------------------------------------------------------------------------------------
# Output folder


def existing_ancestor(path: Path) -> Path:
    """The folder itself, or the nearest parent that exists (where it would be created)."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(path: Path, source: str, need_bytes: int, resume: str | None, overwrite: bool) -> None:
    """The output folder must be creatable, writable, have room for a checkpoint, be free of another live run,
    and hold no earlier run unless resuming (or `--overwrite`). Read-only."""
    from ds_distill.utils import checkpoint as ckpt

    if path.exists() and not path.is_dir():
        raise RecipeError(f"{source}: training.output_dir: {path} exists and is not a folder")
    base = existing_ancestor(path)
    if not base.is_dir():
        raise RecipeError(f"{source}: training.output_dir: {base} is not a folder, {path} cannot be created there")
    if not os.access(base, os.W_OK | os.X_OK):
        raise RecipeError(f"{source}: training.output_dir: {path} is not writable (no write permission on {base})")
    free = shutil.disk_usage(base).free
    if free < need_bytes:
        raise RecipeError(f"{source}: training.output_dir: {path} has {free / 2**30:.2f} GiB free, a checkpoint "
                          f"needs about {need_bytes / 2**30:.2f} GiB; free space or choose another folder")
    ckpt.check_lock(path)
    contents = ckpt.run_contents(path)
    if contents and not resume and not overwrite:
        shown = ", ".join(contents[:3]) + (", ..." if len(contents) > 3 else "")
        raise CheckpointError(f"{path}: training.output_dir holds an earlier run ({shown}); continue it with "
                              f"--resume latest, move it aside with --overwrite, or choose another output_dir")


def checkpoint_bytes(components: dict, recipe, ema: bool) -> int:
    """A checkpoint's size: per trainable role fp32 master + two Adam moments + module weights (+ EMA) of the
    trained parameters (a LoRA role: its adapters) of every part the family says the role trains."""
    from ds_distill.dispatch import get_family

    total = 0
    for name, spec in recipe.roles.items():
        if not spec.trainable:
            continue
        parts = get_family(spec.family, recipe.source)().trained_parts(components[name], spec)
        numel = sum(s.numel() for config in parts.values() for s in trained_shapes(config, spec.lora).values())
        per = 4 * 3 + (2 if recipe.training.mixed_precision == "bf16" else 4) + (4 if ema and name == "student" else 0)
        total += numel * per
    return int(total * 1.1)


_META_CACHE: dict[str, dict] = {}


def meta_shapes(config: dict) -> dict:
    """{parameter or buffer name: torch.Size} of a Wan transformer built from its config on the meta device."""
    import torch
    from diffusers import WanTransformer3DModel

    key = json.dumps(config, sort_keys=True, default=str)
    if key not in _META_CACHE:
        with torch.device("meta"):
            model = WanTransformer3DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
        shapes = {n: p.shape for n, p in model.named_parameters()}
        _META_CACHE[key] = shapes
    return _META_CACHE[key]


def meta_model(config: dict, lora=None):
    """A Wan transformer on the meta device (no memory), with `lora` adapters added by diffusers' `add_adapter`."""
    import torch
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
        if lora is not None:
            from ds_distill.models.wan_common import lora_config

            model.add_adapter(lora_config(lora))
    return model


def trained_shapes(config: dict, lora=None) -> dict:
    """{name: torch.Size} of the parameters a trainable role trains: all of them, or with `lora` its adapters
    (the names its checkpoints hold)."""
    if lora is None:
        return meta_shapes(config)
    from ds_distill.utils.module_state import lora_parameter_names

    model = meta_model(config, lora)
    params = dict(model.named_parameters())
    return {n: params[n].shape for n in lora_parameter_names(model)}


LORA_INITS = ("default", "gaussian")


def check_lora(recipe, components: dict) -> None:
    """Each role's `lora`: only on a trainable role, rank and alpha positive, dropout in [0, 1), an init peft has,
    and every target module names layers of the role's transformer that peft can wrap (checked on a meta-device
    model with diffusers' own `add_adapter`)."""
    src = recipe.source
    for name, spec in recipe.roles.items():
        lora = spec.lora
        if lora is None:
            continue
        key = f"roles.{name}.lora"
        if not spec.trainable:
            raise RecipeError(f"{src}: {key}: role {name!r} is frozen (trainable: false), and LoRA trains adapters; "
                              f"remove {key} (a frozen role is used as it is)")
        if isinstance(lora.rank, bool) or int(lora.rank) < 1:
            raise RecipeError(f"{src}: {key}.rank: {lora.rank} must be at least 1 (e.g. 16, 32, 64)")
        if not lora.alpha > 0:
            raise RecipeError(f"{src}: {key}.alpha: {lora.alpha} must be positive (the update is alpha / rank x B A; "
                              f"alpha = rank scales it by 1)")
        if not 0 <= lora.dropout < 1:
            raise RecipeError(f"{src}: {key}.dropout: {lora.dropout} must be in [0, 1)")
        if lora.init not in LORA_INITS:
            raise RecipeError(f"{src}: {key}.init: {lora.init!r} is not one of {', '.join(LORA_INITS)} (default: B = 0, "
                              f"training starts at the base model)")
        targets = list(lora.target_modules or [])
        if not targets:
            raise RecipeError(f"{src}: {key}.target_modules: name at least one layer (default: the attention "
                              f"projections to_q, to_k, to_v, to_out.0)")
        config = components[name].transformer_config
        names = [n for n, _ in meta_model(config).named_modules()]
        for target in targets:
            if not any(n == target or n.endswith("." + target) for n in names):
                raise RecipeError(f"{src}: {key}.target_modules: {target!r} names no layer of {components[name].path}'s "
                                  f"transformer (e.g. to_q, to_k, to_v, to_out.0, ffn.net.0.proj, ffn.net.2)")
        try:
            meta_model(config, lora)
        except (ValueError, TypeError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise RecipeError(f"{src}: {key}.target_modules: peft cannot add adapters there ({first})") from None


def transformer_numel(config: dict) -> int:
    """Parameter count of a Wan transformer from its config (no weights loaded)."""
    return sum(s.numel() for s in meta_shapes(config).values())


# ----------------------------------------------------------------------------------------------
# Model folders


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size (no tensor is read)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ValueError(f"header claims {n} bytes, the file has {size}")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({exc}); re-download or re-export it") from None
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise UserError(f"{path}: truncated: its tensors need {8 + n + end} bytes, the file has {size} "
                        f"(an interrupted copy?); copy it again")
    return header


def check_weights(folder: Path, config: dict, key: str, source: str) -> None:
    """config.json and safetensors complete: the shard index names files that exist, every header reads, every
    tensor the model needs is there with the right shape."""
    from ds_distill.models.components import WEIGHT_INDEX_SUFFIX

    if not config:
        raise RecipeError(f"{source}: {key}: {folder}/config.json is missing or empty")
    index = sorted(folder.glob(f"*{WEIGHT_INDEX_SUFFIX}"))
    if index:
        try:
            weight_map = json.loads(index[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, OSError) as exc:
            raise UserError(f"{index[0]}: not a readable shard index ({type(exc).__name__}: {exc})") from None
        files = sorted(set(weight_map.values()))
        for fname in files:
            if not (folder / fname).is_file():
                raise UserError(f"{index[0]}: names shard {fname}, which is not in {folder} (incomplete download?)")
        names = {}
        for fname in files:
            header = safetensors_header(folder / fname)
            for n, v in header.items():
                if n != "__metadata__":
                    names[n] = (v.get("shape"), folder / fname)
        for n, fname in weight_map.items():
            if n not in names:
                raise UserError(f"{index[0]}: names {n!r} in {fname}, which that shard does not hold")
    else:
        singles = sorted(folder.glob("*.safetensors"))
        if not singles:
            raise UserError(f"{folder}: no .safetensors weights found (pickled .bin weights are not loaded)")
        names = {}
        for f in singles:
            for n, v in safetensors_header(f).items():
                if n != "__metadata__":
                    names[n] = (v.get("shape"), f)
    try:
        expected = meta_shapes(config)
    except Exception as exc:  # diffusers refuses a config: name the file
        raise RecipeError(f"{source}: {key}: {folder}/config.json does not describe a Wan transformer "
                          f"({type(exc).__name__}: {exc})") from None
    missing = [n for n in expected if n not in names]
    if missing:
        raise UserError(f"{folder}: weights for {missing[0]!r} are missing ({len(missing)} parameters)")
    for n, want in expected.items():
        shape, f = names[n]
        if list(shape) != list(want):
            raise UserError(f"{f}: {n} has shape {list(shape)}, config.json says {list(want)} "
                            f"(config.json and weights disagree)")


def check_template(cfg, path_key: str, source: str) -> None:
    """A DeepSpeed template must be a JSON object with an object `zero_optimization` (the stage of trainable
    roles' templates is checked by `load_template`)."""
    if not isinstance(cfg, dict):
        raise RecipeError(f"{source}: {path_key}: the DeepSpeed template must be a JSON object")
    if not isinstance(cfg.get("zero_optimization", {}), dict):
        raise RecipeError(f"{source}: {path_key}: zero_optimization must be a JSON object")


# ----------------------------------------------------------------------------------------------
# Sizes and data


def generates_at_size(checked) -> bool:
    """Whether the method makes latents of training.num_frames/height/width itself (not from data)."""
    hook = getattr(checked.method_cls, "generates_at_size", None)
    if hook is not None:
        return bool(hook(checked.method_config))
    return not checked.method_cls.needs_latents(checked.method_config)


def check_sizes(recipe, comps, source: str) -> tuple[int, int, int, int]:
    """training.num_frames/height/width as the sampler checks them: 4k+1 frames, multiples of the VAE stride x
    patch, within the rotary range. Returns the latent shape [C, T, H, W] they give."""
    from ds_distill.models.wan_common import latent_shape_for

    t, cfg = recipe.training, comps.transformer_config
    spatial = int(comps.vae_config.get("scale_factor_spatial", 8))
    temporal = int(comps.vae_config.get("scale_factor_temporal", 4))
    pt, ph, pw = list(cfg.get("patch_size") or (1, 2, 2))[:3]
    if (t.num_frames - 1) % temporal:
        raise RecipeError(f"{source}: training.num_frames: {t.num_frames} is not {temporal}*k+1 "
                          f"(e.g. {(t.num_frames - 1) // temporal * temporal + 1})")
    for key, multiple in (("height", spatial * ph), ("width", spatial * pw)):
        value = getattr(t, key)
        if value % multiple:
            raise RecipeError(f"{source}: training.{key}: {value} is not a multiple of {multiple} (VAE stride "
                              f"{spatial} x patch {multiple // spatial})")
    shape = latent_shape_for(comps.vae_config, t.num_frames, t.height, t.width)
    if "in_channels" in cfg:
        shape = (int(cfg["in_channels"]), *shape[1:])
    rope = int(cfg.get("rope_max_seq_len", 1024))
    for key, n, p in (("num_frames", shape[1], pt), ("height", shape[2], ph), ("width", shape[3], pw)):
        if -(-n // p) > rope:
            raise RecipeError(f"{source}: training.{key}: gives {-(-n // p)} patches along that axis, beyond the "
                              f"model's rotary range (rope_max_seq_len {rope})")
    return tuple(shape)


def sample_indices(dataset, count: int, seed: int = 0) -> list[int]:
    """The first row of every file, plus `count` rows drawn across the whole dataset."""
    picked = set(dataset._starts)
    rng = random.Random(seed)
    picked.update(rng.sample(range(len(dataset)), min(count, len(dataset))))
    return sorted(picked)


def check_data_fits_model(dataset, components: dict, recipe, need_latents: bool,
                          generated: tuple | None = None) -> None:
    """A sample of rows decodes and is finite; text dims, latent channels and shapes fit the student's transformer
    and each other (and the generated size where the method generates at training.num_frames/height/width)."""
    cfg = components["student" if "student" in components else next(iter(components))].transformer_config
    src = recipe.training.data_path
    channels, text_dim = cfg.get("in_channels"), cfg.get("text_dim")
    patch = cfg.get("patch_size", [1, 2, 2])
    first_shape = None
    for index in sample_indices(dataset, SAMPLE_ROWS, recipe.training.seed):
        path, local = dataset.locate(index)
        row = dataset[index]
        d = row["text_embedding"].shape[-1]
        if text_dim is not None and d != text_dim:
            raise DataError(f"{path}: text_embedding_shape: embeddings have dim {d}, the model's text_dim is "
                            f"{text_dim} (data made by another text encoder?)")
        if not need_latents:
            continue
        shape = list(row["vae_latent"].shape)
        if len(shape) != 4:
            raise DataError(f"{path}: vae_latent_shape: expected [C, T, H, W], got {shape}")
        if channels is not None and shape[0] != channels:
            raise DataError(f"{path}: vae_latent_shape: latents have {shape[0]} channels, the model expects "
                            f"{channels} (data made by another VAE?)")
        for dim, p, name in zip(shape[1:], patch, ("T", "H", "W")):
            if dim % p:
                raise DataError(f"{path}: vae_latent_shape: {name}={dim} is not a multiple of the patch size {p}")
        if first_shape is None:
            first_shape = (shape, path, local)
        elif shape != first_shape[0]:
            raise DataError(f"{path}: row {local}: vae_latent_shape {shape} differs from {first_shape[0]} "
                            f"({first_shape[1]} row {first_shape[2]}); one run needs one latent size")
        if generated is not None and tuple(shape) != tuple(generated):
            t = recipe.training
            raise DataError(f"{path}: row {local}: vae_latent_shape {shape}, but the method generates "
                            f"{list(generated)} (training.num_frames={t.num_frames}, height={t.height}, "
                            f"width={t.width}); set them to the size the data was encoded at")
    world = int(os.environ.get("WORLD_SIZE", "1")) // max(1, recipe.training.sp_size)  # data-parallel groups
    global_batch = recipe.training.train_batch_size * world
    if len(dataset) < global_batch:
        raise DataError(f"{src}: the dataset has {len(dataset)} rows, fewer than one global batch "
                        f"({recipe.training.train_batch_size} per rank x {world} ranks); lower train_batch_size")


# ----------------------------------------------------------------------------------------------
# Resume


def checkpoint_shapes(role_dir: Path) -> dict | None:
    """{parameter name: shape} recorded in a role's DeepSpeed model states (None when not recorded)."""
    import torch

    files = sorted(role_dir.glob("*_model_states.pt"))
    try:
        states = torch.load(files[0], map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign pickle
        raise CheckpointError(f"{files[0]}: --resume: unreadable model states ({type(exc).__name__}); "
                              f"use another checkpoint") from None
    groups = states.get("param_shapes") if isinstance(states, dict) else None
    if not groups:
        return None
    out = {}
    for g in groups if isinstance(groups, list) else [groups]:
        out.update({k: list(v) for k, v in g.items()})
    return out


def check_gan_head(role_dir: Path, saved: dict, recipe) -> None:
    """A critic checkpoint with DMD2's GAN head (gan_head.* parameters) resumes only into a run with the GAN term on,
    and one without the head only into a run with it off (the head's optimizer state lives in the critic's engine)."""
    from ds_distill.methods.distribution_matching.gan import GAN_HEAD

    has_head = any(n.startswith(GAN_HEAD + ".") for n in saved)
    weight = (recipe.method_config or {}).get("gan_loss_weight_gen") or 0
    if recipe.recipe.method != "dmd2" or has_head == (weight > 0):
        return
    if has_head:
        raise CheckpointError(f"{role_dir}: --resume: holds DMD2's GAN head, but the recipe has the GAN term off "
                              f"(method_config.gan_loss_weight_gen {weight}); resume with the GAN settings of the run "
                              f"that wrote it, or start a new run")
    raise CheckpointError(f"{role_dir}: --resume: holds no GAN head, but the recipe turns the GAN term on "
                          f"(method_config.gan_loss_weight_gen {weight}); set it to 0 as the run that wrote it did, "
                          f"or start a new run")


def check_resume(output_dir: Path, resume: str, recipe, components: dict) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume: complete, written by this method for these trainable roles, with parameters of
    the shapes the recipe's models have (every part the family says a role trains)."""
    from ds_distill.dispatch import get_family
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
        saved = checkpoint_shapes(path / role)
        if saved is None:
            continue
        if role == "critic":
            check_gan_head(path / role, saved, recipe)
        spec = recipe.roles[role]
        lora = spec.lora
        parts = get_family(spec.family, recipe.source)().trained_parts(components[role], spec)
        expected = {prefix + n: list(s) for prefix, config in parts.items()
                    for n, s in trained_shapes(config, lora).items()}
        if lora is None and any(".lora_" in n for n in saved):
            raise CheckpointError(f"{path}/{role}: --resume: holds LoRA adapters, but the recipe trains {role} in full; "
                                  f"set roles.{role}.lora as the run that wrote it did")
        if lora is not None and not any(".lora_" in n for n in saved):
            raise CheckpointError(f"{path}/{role}: --resume: holds full weights, but the recipe trains LoRA adapters "
                                  f"for {role} (roles.{role}.lora); remove it or start a new run")
        # Shapes that differ first (the telling line), then parameters one side lacks.
        for n in sorted(expected, key=lambda n: (n not in saved, n)):
            if saved.get(n) != expected[n]:
                got = saved.get(n, "missing")
                raise CheckpointError(f"{path}/{role}: --resume: {n} is {got} in the checkpoint, {expected[n]} "
                                      f"in {recipe.roles[role].path} (written by a model of another shape)")
    return path, state


# ----------------------------------------------------------------------------------------------


def run(recipe, checked, resume: str | None, overwrite: bool = False) -> Preflight:
    """All checks, in the order a user would fix them. Writes nothing."""
    from ds_distill.dispatch import get_family
    from ds_distill.engines import load_template
    from ds_distill.models.components import transformer_dir
    from ds_distill.utils.config import resolve_path
    from ds_distill.utils.dataloader import ParquetDataset

    imports = time.perf_counter()
    import deepspeed  # noqa: F401  (the run needs both right after; importing them is not a check's cost)
    from diffusers import WanTransformer3DModel  # noqa: F401

    started = time.perf_counter()
    src, t = recipe.source, recipe.training
    components, weights_checked = {}, set()
    for name, spec in recipe.roles.items():
        key = f"roles.{name}.path"
        components[name] = get_family(spec.family, src)().components(spec.path, src, key)
        folder = transformer_dir(components[name].path)
        if folder not in weights_checked:
            check_weights(folder, components[name].transformer_config, key, src)
            weights_checked.add(folder)
        default = t.ds_config if spec.trainable else t.ds_config_inference
        tkey = f"roles.{name}.ds_config" if spec.ds_config else \
            ("training.ds_config" if spec.trainable else "training.ds_config_inference")
        check_template(load_template(spec.ds_config or default, src, tkey), tkey, src)
        load_template(spec.ds_config or default, src, tkey, trainable=spec.trainable)  # ZeRO stage 3 if trainable
    check_lora(recipe, components)
    for name, spec in recipe.roles.items():  # which experts a role may name is its family's to say
        if spec.experts is not None:
            check = getattr(get_family(spec.family, src)(), "check_experts", None)
            if check is None:
                raise RecipeError(f"{src}: roles.{name}.experts: family {spec.family!r} has no experts; remove the key")
            check(components[name], spec, src, f"roles.{name}")
    main_role = "student" if "student" in components else next(iter(components))
    get_family(recipe.recipe.family, src)().check_unconditional(components[main_role], t, src)
    generated = check_sizes(recipe, components[main_role], src) if generates_at_size(checked) else None
    need_latents = checked.method_cls.needs_latents(checked.method_config)
    dataset = ParquetDataset(t.data_path, t.text_len, need_latents)
    check_data_fits_model(dataset, components, recipe, need_latents, generated)
    from ds_distill.parallel import check_recipe_layout

    check_recipe_layout(recipe, components, generated, dataset if need_latents else None)
    if t.log_validation:
        from ds_distill.validators.prompts import load_prompts

        load_prompts(resolve_path(t.validation_dataset_file, recipe))
    ema = bool(getattr(checked.method_config, "ema_decay", 0))
    output_dir = Path(t.output_dir)
    check_output_dir(output_dir, src, checkpoint_bytes(components, recipe, ema), resume, overwrite)
    resume_path, state = check_resume(output_dir, resume, recipe, components) if resume else (None, None)
    return Preflight(dataset=dataset, components=components, resume_path=resume_path, resume_state=state,
                     seconds=time.perf_counter() - started, import_seconds=started - imports)

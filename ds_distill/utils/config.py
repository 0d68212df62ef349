"""Recipe schema v2: typed dataclasses, YAML loading, dotted overrides, one-line errors.

A recipe is the single source of truth for a run:

    recipe: {family: wan, method: dmd2}
    roles: {student: {path: ..., trainable: true}, teacher: {...}, critic: {...}}
    training: {...}          # infrastructure: data, batch sizes, optimizer defaults, cadence
    pipeline_config: {...}   # model-side sampling facts (flow_shift, sampler_kind)
    method_config: {...}     # algorithm knobs, validated against the method's own dataclass

Every problem is reported as a RecipeError naming the file and the dotted key.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from ds_distill.errors import RecipeError

WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards"
)


@dataclass
class RecipeSpec:
    """Which model family and which method this recipe runs."""

    family: str
    """Registered model family, e.g. `wan`."""
    method: str
    """Registered method, e.g. `dmd2` or `finetune`."""


@dataclass
class LoraSpec:
    """Low-rank adapters on a trainable role (peft through diffusers' adapter support); the base stays frozen."""

    rank: int = 16
    """Adapter rank r."""
    alpha: float = 16.0
    """Scaling numerator: the update is (alpha / rank) * B @ A."""
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """Module names (peft's suffix matching) that get adapters; default: the attention projections."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    init: Literal["default", "gaussian"] = "default"
    """Adapter initialisation: peft's default (B = 0, so training starts at the base model) or gaussian."""


@dataclass
class RoleSpec:
    """One model role (student, teacher, critic, ...)."""

    path: str
    """Diffusers-format model directory (or a hub id when online)."""
    trainable: bool
    """Whether this role gets an optimizer and receives gradients."""
    family: Optional[str] = None
    """Model family for this role; defaults to `recipe.family`."""
    ds_config: Optional[str] = None
    """DeepSpeed JSON template for this role; defaults to training.ds_config / ds_config_inference."""
    offload_param: Optional[Literal["none", "cpu", "nvme"]] = None
    """ZeRO-3 parameter offload for this role; defaults to training.offload_param (frozen roles only)."""
    gradient_checkpointing: Optional[bool] = None
    """Activation checkpointing of the transformer blocks; defaults to training.gradient_checkpointing."""
    lora: Optional[LoraSpec] = None
    """Train low-rank adapters instead of the full weights (trainable roles only)."""
    experts: Optional[list[str]] = None
    """A model of several experts in one role: the experts that train, by the family's names (the others stay
    frozen); default: all. Trainable roles only; the family checks the names (preflight)."""


@dataclass
class TrainingConfig:
    """Infrastructure: data, batch sizes, optimizer defaults, precision, cadence, tracking."""

    output_dir: str
    """Where checkpoints, logs, validation videos and the resolved recipe go."""
    data_path: Union[str, list[str], dict[str, int]]
    """A parquet file or a directory of parquet files (FastVideo T2V schema, or text-only); a list of them; or a
    mapping {path: repeat_count} that mixes datasets, each row of a path drawn repeat_count times per epoch."""
    max_train_steps: int = 1000
    """Number of optimizer steps (DMD2: iterations) to run."""
    train_batch_size: int = 1
    """Micro-batch per rank."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step (finetune only)."""
    dataloader_num_workers: int = 2
    """DataLoader worker processes per rank."""
    num_gpus: Optional[int] = None
    """Total ranks the recipe was written for (all nodes); when set, a launch with another world size stops with
    one line. Unset: any world size."""
    sp_size: int = 1
    """Sequence parallelism (DeepSpeed-Ulysses): groups of this many consecutive ranks split each sample's tokens
    (same samples and noise inside a group); data parallelism runs over world / sp_size groups."""
    seed: int = 0
    """Seed for data order, noise, timesteps and control flow (same on every rank)."""
    mixed_precision: Literal["fp32", "bf16"] = "bf16"
    """Parameter and compute dtype of the DeepSpeed engines (master weights stay fp32)."""
    grad_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype trainable roles reduce-scatter gradients in (DeepSpeed's communication_data_type): fp32 sums every
    rank's contribution unrounded; bf16 halves the traffic."""
    learning_rate: float = 1e-5
    """Default learning rate of trainable roles."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas of trainable roles."""
    weight_decay: float = 0.01
    """AdamW weight decay of trainable roles."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after warm-up."""
    lr_warmup_steps: int = 0
    """Linear warm-up steps."""
    text_len: int = 512
    """Text embeddings are padded or cropped to this many tokens (with an attention mask)."""
    num_frames: int = 81
    """Video frames of generated samples (latent frames follow from the VAE)."""
    height: int = 480
    """Video height of generated samples."""
    width: int = 832
    """Video width of generated samples."""
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    """Negative prompt for classifier-free guidance (encoded once by the family's text encoder)."""
    negative_prompt_embedding: Optional[str] = None
    """A .safetensors file with a precomputed `embedding` [L, D] used instead of encoding `negative_prompt`."""
    uncond_embedding: Literal["negative_prompt", "zeros"] = "negative_prompt"
    """The unconditional text condition: the encoded negative prompt or all zeros."""
    ds_config: str = "ds_configs/zero3_train.json"
    """DeepSpeed template for trainable roles (relative paths resolve against the recipe, then the package)."""
    ds_config_inference: str = "ds_configs/zero3_inference.json"
    """DeepSpeed template for frozen roles (ZeRO-inference)."""
    offload_param: Literal["none", "cpu", "nvme"] = "none"
    """Parameter offload for frozen roles."""
    nvme_path: Optional[str] = None
    """NVMe swap folder when offload_param is `nvme`."""
    gradient_checkpointing: bool = True
    """Activation checkpointing of transformer blocks for trainable roles."""
    fused_optimizer: bool = True
    """Use torch's fused AdamW kernel (one pass over the flat ZeRO partition)."""
    nonfinite_policy: Literal["skip", "abort"] = "abort"
    """A non-finite loss or gradient skips that role's step on every rank; `abort` also stops the run after
    `nonfinite_patience` such steps in a row (`skip` only warns)."""
    nonfinite_patience: int = 3
    """Consecutive non-finite steps that `abort` tolerates."""
    checkpointing_steps: int = 500
    """Save a checkpoint every N steps (0: only at the end)."""
    checkpoints_total_limit: int = 3
    """Keep at most this many checkpoints (0: keep all)."""
    preemption_grace_s: float = 120.0
    """After SIGTERM/SIGINT the run finishes its step, saves and exits; past this many seconds it exits at once
    (no half-written checkpoint: the last complete one stays in charge). Keep it below the scheduler's kill delay."""
    log_steps: int = 1
    """Write scalars every N steps."""
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers, several at once: `tensorboard` (built in), `wandb` (the optional `wandb` package;
    WANDB_MODE=offline logs locally), or `none`."""
    tracker_project_name: str = "ds_distill"
    """wandb project of the run."""
    wandb_run_name: Optional[str] = None
    """wandb run name (default: wandb's own)."""
    log_validation: bool = False
    """Run validation before training and every `validation_steps`."""
    validation_steps: int = 200
    """Validation cadence in steps."""
    validation_dataset_file: Optional[str] = None
    """Validation prompts: JSON {"data": [{"caption": ...}, ...]} or a parquet file with text embeddings."""
    validation_sampling_steps: list[int] = field(default_factory=lambda: [50])
    """Sampling steps for validation of methods that do not choose their own; several counts validate at each.
    Also read as FastVideo's legacy string (`"8"`, `"4,8"`) or a single integer."""
    validation_guidance_scale: float = 5.0
    """Classifier-free guidance for validation of methods that do not choose their own (a legacy string such
    as `"5.0"` is read as the number)."""
    validation_seed: int = 42
    """Seed of the validation noise (fixed across validations)."""
    generator_update_interval: Optional[int] = None
    """Deprecated location of the DMD2 knob; `method_config` wins."""
    real_score_guidance_scale: Optional[float] = None
    """Deprecated location of the DMD2 knob; `method_config` wins."""
    dmd_denoising_steps: Optional[list[int]] = None
    """Deprecated location of the DMD2 knob; `method_config` wins."""
    simulate_generator_forward: Optional[bool] = None
    """Deprecated (v1): use method_config.rollout_mode (simulate | data)."""


@dataclass
class PipelineConfig:
    """Model-side sampling facts shared by training and inference."""

    flow_shift: float = 3.0
    """Timestep shift S: sigma = S*u / (1 + (S-1)*u)."""
    sampler_kind: Literal["ode", "sde"] = "ode"
    """Default sampling loop for validation and `ds-distill sample`."""


@dataclass
class Recipe:
    """A whole resolved recipe (schema v2)."""

    recipe: RecipeSpec
    roles: dict[str, RoleSpec]
    training: TrainingConfig
    pipeline_config: PipelineConfig = field(default_factory=PipelineConfig)
    method_config: dict[str, Any] = field(default_factory=dict)
    source: str = "<recipe>"
    """The file the recipe came from (for error messages); not part of the YAML."""
    attn_kind: Optional[str] = field(default=None, init=False)
    """`method_config.attn_kind` when the recipe sets it: a knob every method accepts (taken out of method_config
    when loading, put back by `to_dict`). Unset means dense."""

    def to_dict(self) -> dict:
        """The recipe as plain data (what `--print-config` prints and the run saves)."""
        data = dataclasses.asdict(self)
        data.pop("source")
        attn_kind = data.pop("attn_kind")
        if attn_kind is not None:
            data["method_config"]["attn_kind"] = attn_kind
        return data


# ----------------------------------------------------------------------------------------------
# Generic typed parsing


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if hint is bool:
        return "a boolean (true/false)"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if origin is Literal:
        return "one of " + " | ".join(str(a) for a in typing.get_args(hint))
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        plural = {int: "integers", float: "numbers", str: "strings"}.get(typing.get_args(hint)[1])
        return f"a mapping of {plural}" if plural else "a mapping"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return str(hint)


def _is_optional(hint: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return True, args[0]
    return False, hint


def coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check `value` against a type hint and return it converted; raise RecipeError naming `key`."""
    optional, inner = _is_optional(hint)
    if value is None:
        if optional:
            return None
        raise RecipeError(f"{source}: {key}: expected {_type_name(inner)}, got null")
    hint = inner
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):  # several shapes (e.g. a path or a {path: count} mapping): first fit
        arms = [a for a in typing.get_args(hint) if a is not type(None)]
        errors = []
        for arm in arms:
            try:
                return coerce(value, arm, key, source)
            except RecipeError as exc:
                errors.append((typing.get_origin(arm), exc))
        for arm_origin, exc in errors:  # a mapping or list that fits an arm's shape: that arm's message names the item
            if (arm_origin is dict and isinstance(value, dict)) or (arm_origin is list and isinstance(value, list)):
                raise exc
        shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
        raise RecipeError(f"{source}: {key}: expected {' or '.join(_type_name(a) for a in arms)}, got {shown}")

    def bad():
        shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
        return RecipeError(f"{source}: {key}: expected {_type_name(hint)}, got {shown}")

    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-4` (no dot) as a string; accept what is clearly a number.
            try:
                value = float(value)
            except ValueError:
                raise bad() from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        if not math.isfinite(value):
            raise RecipeError(f"{source}: {key}: {value} is not a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad()
        return value
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise bad()
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad()
        (item_hint,) = typing.get_args(hint)[:1] or (Any,)
        return [coerce(v, item_hint, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        _, val_hint = typing.get_args(hint)
        return {str(k): coerce(v, val_hint, f"{key}.{k}", source) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise bad()
        return from_dict(hint, value, key, source)
    raise TypeError(f"unsupported type hint {hint!r} for {key}")


def from_dict(cls: type, data: dict, key: str, source: str):
    """Build dataclass `cls` from a mapping: unknown keys, missing keys and wrong types are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != "source"}
    prefix = f"{key}." if key else ""
    for name in data:
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise RecipeError(f"{source}: {prefix}{name}: unknown key (known keys: {known})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = coerce(data[name], hints[name], f"{prefix}{name}", source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{source}: {prefix}{name}: required key is missing")
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------
# Overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.max_train_steps=5` -> (["training", "max_train_steps"], 5); the value is YAML."""
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected key=value, e.g. training.max_train_steps=10")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"override {text!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted overrides to the raw recipe mapping (types are checked afterwards)."""
    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {text!r}: {part} is not a mapping")
            node = child
        node[parts[-1]] = value
    return data


# ----------------------------------------------------------------------------------------------
# Loading


V1_HINT = (
    "the v1 `distill:` section is no longer read; move `distill.model`/`distill.method` to "
    "`recipe: {family: ..., method: ...}`, list models under `roles:` (student/teacher/critic with path and "
    "trainable), and put algorithm knobs in `method_config:` (see README, 'Migrating from v1')"
)


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping safely; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level (recipe:, roles:, training:, ...)")
    return data


def check_finite(data: Any, source: str, key: str = "") -> None:
    """Refuse NaN and infinities anywhere in a raw recipe mapping (YAML's `.nan`, `.inf`), naming the key."""
    if isinstance(data, float) and not math.isfinite(data):
        raise RecipeError(f"{source}: {key}: {data} is not a finite number")
    if isinstance(data, dict):
        for k, v in data.items():
            check_finite(v, source, f"{key}.{k}" if key else str(k))
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            check_finite(v, source, f"{key}[{i}]")


ATTN_KINDS = ("dense",)
"""Attention kinds a recipe may name in `method_config.attn_kind` (sparse kinds are not implemented)."""


def looks_like_fastvideo(data: dict) -> bool:
    """FastVideo's `fastvideo/train` layout: `models:` / `method:` entries carrying `_target_`."""
    sections = [data.get("models"), data.get("method")]
    models = data.get("models")
    if isinstance(models, dict):
        sections += list(models.values())
    return any(isinstance(s, dict) and "_target_" in s for s in sections)


def legacy_step_counts(value: Any, key: str, source: str) -> Any:
    """FastVideo's legacy `validation_sampling_steps` (`"8"`, `"4,8"`, or an integer) as a list of counts."""
    if isinstance(value, bool):
        return value  # left for the type check to name
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        try:
            counts = [int(part) for part in value.split(",")]
        except ValueError:
            raise RecipeError(f"{source}: {key}: expected step counts like \"8\" or \"4,8\" (comma-separated "
                              f"integers), got {value!r}") from None
        return counts
    return value


def normalize_legacy(data: dict, source: str) -> dict:
    """Spellings older recipes and FastVideo use, read as schema v2 (a new mapping; `data` is not changed)."""
    data = copy.deepcopy(data)
    training = data.get("training")
    if isinstance(training, dict) and "validation_sampling_steps" in training:
        training["validation_sampling_steps"] = legacy_step_counts(
            training["validation_sampling_steps"], "training.validation_sampling_steps", source)
    return data


def recipe_from_mapping(data: dict, source: str) -> Recipe:
    """Validate a raw mapping as schema v2 (without checking the method's own knobs)."""
    check_finite(data, source)
    if "distill" in data:
        raise RecipeError(f"{source}: distill: {V1_HINT}")
    if looks_like_fastvideo(data):
        raise RecipeError(f"{source}: models: this is FastVideo's fastvideo/train layout; convert it once with "
                          f"`ds-distill import-recipe {source} OUT.yaml` and train from OUT.yaml")
    if "models" in data and "roles" not in data:
        raise RecipeError(f"{source}: models: this section is called `roles:` in schema v2; rename it")
    if "recipe" not in data:
        raise RecipeError(f"{source}: recipe: required section is missing (recipe: {{family: wan, method: ...}})")
    data = normalize_legacy(data, source)
    method_config = data.get("method_config")
    attn_kind = None
    if isinstance(method_config, dict) and "attn_kind" in method_config:
        attn_kind = method_config.pop("attn_kind")
        if attn_kind not in ATTN_KINDS:
            raise RecipeError(f"{source}: method_config.attn_kind: {attn_kind!r} is not available (attention "
                              f"kinds: {', '.join(ATTN_KINDS)}); use dense or remove the key")
    recipe = from_dict(Recipe, data, "", source)
    recipe.source = source
    recipe.attn_kind = attn_kind
    if not recipe.roles:
        raise RecipeError(f"{source}: roles: at least one role is required")
    for name, role in recipe.roles.items():
        if role.family is None:
            role.family = recipe.recipe.family
        if role.experts is not None:
            if not role.trainable:
                raise RecipeError(f"{source}: roles.{name}.experts: only a trainable role trains experts; remove "
                                  "the key (a frozen role runs them all)")
    check_training(recipe.training, source)
    return recipe


def check_training(t: TrainingConfig, source: str) -> None:
    """Value checks of the keys this module reads into shapes of their own (data mixes, step lists, trackers,
    num_gpus)."""
    if isinstance(t.data_path, list) and not t.data_path:
        raise RecipeError(f"{source}: training.data_path: the list is empty; name at least one dataset")
    if isinstance(t.data_path, dict):
        if not t.data_path:
            raise RecipeError(f"{source}: training.data_path: the mapping is empty; give {{path: repeat_count}} "
                              f"entries or one path")
        for path, count in t.data_path.items():
            if count < 1:
                raise RecipeError(f"{source}: training.data_path.{path}: repeat count {count} must be at least 1 "
                                  f"(remove the entry to leave that dataset out)")
    if not t.validation_sampling_steps or any(n < 1 for n in t.validation_sampling_steps):
        raise RecipeError(f"{source}: training.validation_sampling_steps: every step count must be at least 1, got "
                          f"{t.validation_sampling_steps}")
    from ds_distill.utils.tracking import check_trackers

    check_trackers(t, source)
    if t.num_gpus is not None and t.num_gpus < 1:
        raise RecipeError(f"{source}: training.num_gpus: must be at least 1 (or leave it out)")


def check_world_size(recipe: Recipe, world_size: int) -> None:
    """`training.num_gpus`, when set, must equal the launched number of ranks."""
    n = recipe.training.num_gpus
    if n is not None and n != world_size:
        raise RecipeError(f"{recipe.source}: training.num_gpus: the recipe is for {n} rank(s), this launch has "
                          f"{world_size}; launch {n} (e.g. deepspeed --num_gpus {n}), or set "
                          f"training.num_gpus={world_size}")


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file, apply dotted overrides, and type-check it."""
    data = read_yaml(path)
    data = apply_overrides(data, overrides or [])
    return recipe_from_mapping(data, str(path))


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None, width=120)


def resolve_path(path: str, recipe: Recipe) -> Path:
    """A path from the recipe: absolute, or relative to the working directory, else to the recipe file."""
    p = Path(os.path.expanduser(path))
    if p.is_absolute() or p.exists():
        return p
    beside = Path(recipe.source).parent / p
    return beside if beside.exists() else p

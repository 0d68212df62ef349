"""Registries of model families and methods, and `build_runtime`: recipe -> roles, engines, adapter, method.

Adding a family or a method is one registration each (N+M), never a family x method combination.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

from ds_distill.errors import RecipeError

logger = logging.getLogger("ds_distill")

_FAMILIES: dict[str, type] = {}
_METHODS: dict[str, type] = {}

# Built-ins are imported explicitly (no package scanning), so what exists is visible here.
_BUILTIN_MODULES = (
    "ds_distill.models.wan",
    "ds_distill.methods.fine_tuning.finetune",
    "ds_distill.methods.distribution_matching.dmd2",
)


def _register(table: dict, kind: str, name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in table and table[name] is not cls:
            raise ValueError(f"{kind} {name!r} is already registered by {table[name].__module__}")
        table[name] = cls
        return cls

    return deco


def register_family(name: str) -> Callable[[type], type]:
    """Class decorator: make a model family available as `recipe.family: <name>`."""
    return _register(_FAMILIES, "family", name)


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator: make a method available as `recipe.method: <name>`."""
    return _register(_METHODS, "method", name)


def load_builtins() -> None:
    """Import the built-in families and methods (idempotent)."""
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)


def get_family(name: str, source: str = "<recipe>", key: str = "recipe.family") -> type:
    load_builtins()
    if name not in _FAMILIES:
        raise RecipeError(f"{source}: {key}: unknown family {name!r} (registered: {', '.join(sorted(_FAMILIES))})")
    return _FAMILIES[name]


def get_method(name: str, source: str = "<recipe>", key: str = "recipe.method") -> type:
    load_builtins()
    if name not in _METHODS:
        raise RecipeError(f"{source}: {key}: unknown method {name!r} (registered: {', '.join(sorted(_METHODS))})")
    return _METHODS[name]


def registered() -> tuple[list[str], list[str]]:
    """Names of registered families and methods."""
    load_builtins()
    return sorted(_FAMILIES), sorted(_METHODS)


@dataclass
class CheckedRecipe:
    """A recipe whose family, method, roles and method knobs have been validated."""

    recipe: Any
    method_cls: type
    method_config: Any


def check_recipe(recipe) -> CheckedRecipe:
    """Everything that can be checked without touching files or processes."""
    from ds_distill.roles import require_roles
    from ds_distill.utils.config import from_dict

    src = recipe.source
    get_family(recipe.recipe.family, src)
    for name, role in recipe.roles.items():
        get_family(role.family, src, f"roles.{name}.family")
    method_cls = get_method(recipe.recipe.method, src)
    require_roles(recipe.roles, method_cls.roles, recipe.recipe.method, src)
    method_config = from_dict(method_cls.config_class, recipe.method_config, "method_config", src)
    t = recipe.training
    for key in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "text_len", "log_steps"):
        if getattr(t, key) < 1:
            raise RecipeError(f"{src}: training.{key}: must be at least 1")
    for key in ("checkpointing_steps", "checkpoints_total_limit", "dataloader_num_workers", "lr_warmup_steps"):
        if getattr(t, key) < 0:
            raise RecipeError(f"{src}: training.{key}: must not be negative")
    if t.learning_rate <= 0:
        raise RecipeError(f"{src}: training.learning_rate: must be positive")
    if not t.output_dir.strip():
        raise RecipeError(f"{src}: training.output_dir: must name a folder (an empty value would write into the "
                          f"current directory)")
    for key in ("num_frames", "height", "width"):
        if getattr(t, key) < 1:
            raise RecipeError(f"{src}: training.{key}: must be at least 1")
    if t.preemption_grace_s <= 0:
        raise RecipeError(f"{src}: training.preemption_grace_s: must be positive (seconds a preempted run may "
                          f"spend finishing its step and saving)")
    if recipe.pipeline_config.flow_shift <= 0:
        raise RecipeError(f"{src}: pipeline_config.flow_shift: must be positive (Wan uses 3.0 at 480p, 5.0 at 720p)")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise RecipeError(f"{src}: training.betas: expected two numbers in [0, 1)")
    if t.log_validation and not t.validation_dataset_file:
        raise RecipeError(f"{src}: training.validation_dataset_file: required when log_validation is true")
    if t.sp_size < 1:
        raise RecipeError(f"{src}: training.sp_size: must be at least 1 (1: no sequence parallelism)")
    if t.sp_size > 1:
        for name, role in recipe.roles.items():
            if not hasattr(get_family(role.family, src), "enable_sequence_parallel"):
                raise RecipeError(f"{src}: training.sp_size: family {role.family!r} (roles.{name}) has no sequence "
                                  f"parallelism; set training.sp_size: 1")
        if getattr(method_cls, "gan_on", lambda _cfg: False)(method_config):
            raise RecipeError(f"{src}: training.sp_size: the GAN term reads whole-sequence block features, which "
                              f"sequence parallelism splits; set training.sp_size: 1 or "
                              f"method_config.gan_loss_weight_gen: 0")
    method_cls.check_config(method_config, t, src)
    check_latents_in_data(recipe, method_cls, method_config)
    check_depth = getattr(method_cls, "check_role_depths", None)
    if check_depth is not None:
        check_depth(method_config, lambda role: _role_depth(recipe, role), src)
    return CheckedRecipe(recipe=recipe, method_cls=method_cls, method_config=method_config)


def _role_depth(recipe, role: str) -> int | None:
    """Number of transformer blocks of a role (its config's num_layers), or None when it cannot be read yet (a hub
    id offline, a missing folder: the loaders report those)."""
    spec = recipe.roles.get(role)
    if spec is None:
        return None
    try:
        comps = get_family(spec.family, recipe.source)().components(spec.path, recipe.source, f"roles.{role}.path")
    except Exception:
        return None
    depth = comps.transformer_config.get("num_layers")
    return depth if isinstance(depth, int) else None


def check_latents_in_data(recipe, method_cls, method_config) -> None:
    """A method knob that needs real latents (e.g. DMD2's GAN term) over text-only data is a recipe mistake, named
    by its knob. Reads only parquet schemas; paths that do not exist or do not read are left to the data checks."""
    import pyarrow.parquet as pq

    from ds_distill.utils.config import resolve_path
    from ds_distill.utils.dataloader import data_sources, parquet_files
    from ds_distill.utils.dataset_schema import LATENT_COLUMNS

    why = getattr(method_cls, "latents_needed_by", lambda _cfg: None)(method_config)
    if why is None:
        return
    for source, _ in data_sources(recipe.training.data_path):
        path = resolve_path(str(source), recipe)
        if not path.exists():
            continue
        try:
            files = parquet_files(path)
            names = set(pq.read_schema(files[0]).names)
        except Exception:  # unreadable data gets its own message from the dataset checks
            continue
        if not set(LATENT_COLUMNS) <= names:
            raise RecipeError(f"{recipe.source}: training.data_path: {path} has no vae_latent columns (text only), "
                              f"but {why} needs real latents; use a dataset with latents or turn that off")


@dataclass
class Runtime:
    """Everything a run needs, built from a checked recipe."""

    recipe: Any
    strategy: Any
    family: Any
    components: dict
    bundle: Any
    adapter: Any
    method: Any
    ds_configs: dict
    sp: Any = None
    """The sequence-parallel layout (`ds_distill.parallel.SequenceParallel`) the roles were wired with."""


def build_runtime(checked: CheckedRecipe, strategy, build_engines: bool = True,
                  load_universal: bool = False) -> Runtime:
    """Load every role (partitioned at creation), wrap each in its DeepSpeed engine, build adapter and method."""
    import torch

    from ds_distill.engines import eval_ds_config, load_template, train_ds_config
    from ds_distill.roles import RoleBundle, RoleHandle
    from ds_distill.utils.module_state import apply_trainable

    recipe, t = checked.recipe, checked.recipe.training
    src = recipe.source
    world = strategy.dist.world_size
    sp = strategy.init_sequence_parallel(t.sp_size)
    handles, ds_configs = {}, {}
    comps = {name: get_family(spec.family, src)().components(spec.path, src, f"roles.{name}.path")
             for name, spec in recipe.roles.items()}
    # The adapter first: a method may extend a role (the DMD2 GAN head on the critic) with what it knows of blocks.
    main_family = get_family(recipe.recipe.family, src)()
    main_role = "student" if "student" in comps else next(iter(comps))
    adapter = main_family.build_adapter(comps[main_role], recipe.pipeline_config, t, strategy.dist.device)
    extend_role = getattr(checked.method_cls, "extend_role", None)
    for name, spec in recipe.roles.items():
        family = get_family(spec.family, src)()
        if spec.trainable:
            template = load_template(spec.ds_config or t.ds_config, src, f"roles.{name}.ds_config")
            cfg = train_ds_config(
                template,
                micro_batch=t.train_batch_size,
                grad_accum=t.gradient_accumulation_steps,
                world_size=world,
                precision=t.mixed_precision,
                max_grad_norm=checked.method_cls.optimizer_spec(name, checked.method_config, t).max_grad_norm,
                grad_reduce_dtype=t.grad_reduce_dtype,
                where=f"{src}: roles.{name}.ds_config" if spec.ds_config else f"{src}: training.ds_config",
            )
            if load_universal:  # resuming a checkpoint written with another number of ranks
                cfg.setdefault("checkpoint", {})["load_universal"] = True
        else:
            template = load_template(spec.ds_config or t.ds_config_inference, src, f"roles.{name}.ds_config")
            cfg = eval_ds_config(
                template,
                micro_batch=t.train_batch_size,
                world_size=world,
                precision=t.mixed_precision,
                offload=spec.offload_param or t.offload_param,
                nvme_path=t.nvme_path,
            )
        ds_configs[name] = cfg
        module = family.load_transformer(comps[name], strategy, cfg, trainable=spec.trainable, lora=spec.lora,
                                         experts=spec.experts)
        apply_trainable(module, spec.trainable)
        if sp.size > 1:  # before the engine: ZeRO-3's hooks then see the sliced and gathered tensors
            family.enable_sequence_parallel(module, sp)
        if getattr(checked.method_cls, "zero3_leaf_modules_ok", lambda *_: True)(name, checked.method_config):
            strategy.mark_leaf_modules(module, family.zero3_leaf_modules)
        ckpt = spec.gradient_checkpointing if spec.gradient_checkpointing is not None else t.gradient_checkpointing
        if spec.trainable and ckpt:
            module.enable_gradient_checkpointing()
        if extend_role is not None and spec.trainable:
            # Added modules are created partitioned like the role's own (same zero.Init config) and seeded alike on
            # every rank; they join the role's engine below, so one engine per trainable role stays true.
            zero_cfg = {**cfg, "zero_optimization": {"memory_efficient_linear": False,
                                                     **cfg.get("zero_optimization", {})}}
            with torch.random.fork_rng(devices=[]), strategy.zero_init(zero_cfg):
                torch.manual_seed(t.seed)
                extend_role(name, checked.method_config, module, adapter, src)
        engine = None
        if build_engines:
            if spec.trainable:
                opt = checked.method_cls.optimizer_spec(name, checked.method_config, t)
                engine = strategy.init_trainable(module, cfg, opt)
            else:
                engine = strategy.init_frozen(module, cfg)
        handles[name] = RoleHandle(name=name, module=module, trainable=spec.trainable, engine=engine,
                                   family=spec.family)
    bundle = RoleBundle(handles)
    adapter.set_uncond_embedding(main_family.unconditional_embedding(comps[main_role], t, strategy, src))
    method = checked.method_cls(bundle, adapter, strategy, checked.method_config, t, recipe.pipeline_config)
    return Runtime(recipe=recipe, strategy=strategy, family=main_family, components=comps, bundle=bundle,
                   adapter=adapter, method=method, ds_configs=ds_configs, sp=sp)

"""The one place that talks to DeepSpeed: process groups, config dicts, engines, backward/step, checkpoints.

Methods, adapters and the trainer go through `Strategy`; nothing else imports `deepspeed` for training.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from ds_distill.errors import RecipeError

logger = logging.getLogger("ds_distill")

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
"""The source tree root (ds_configs/, recipes/ live here)."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size, local rank and its torch device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet_deepspeed() -> None:
    level = os.environ.get("DS_DISTILL_DS_LOG_LEVEL", "WARNING").upper()
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(getattr(logging, level, logging.WARNING))


def init_distributed(local_rank: int | None = None) -> DistInfo:
    """Join (or create) the process group.

    Launchers (deepspeed, torchrun) set RANK/WORLD_SIZE/MASTER_*; a plain `python -m ds_distill.train` has none,
    so we make a one-process group on a free local port instead of letting DeepSpeed try MPI discovery.
    """
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank)

    import warnings

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed 0.19 still calls collectives that torch 2.14 marks deprecated, once per call: noise, not news.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+.? is deprecated", category=FutureWarning)
    _quiet_deepspeed()
    accel = get_accelerator()
    if accel.device_name() == "cpu" and os.environ.get("DS_DISTILL_SHM_COMM", "0") != "1":
        # The CPU accelerator JIT-builds a shared-memory allreduce (40-90 s on a fresh machine) before it
        # falls back to gloo; our tensors are small enough that gloo alone is the better trade.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), verbose=False)
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if "OMP_NUM_THREADS" not in os.environ and local_world > 1:
        # Launchers that do not set it leave every rank with all cores: N ranks x N threads thrash.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    lrank = int(os.environ.get("LOCAL_RANK", "0"))
    if accel.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        accel.set_device(lrank)
        device = torch.device(accel.device_name(), lrank)
    return DistInfo(rank=rank, world_size=world, local_rank=lrank, device=device)


def comm_device() -> torch.device:
    """The device the process group's collectives take tensors on (the accelerator's; `cpu` under gloo)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Collective: each tensor takes rank `src`'s value in place, staged through the communication device (a no-op
    without a group of two or more ranks). For tensors outside ZeRO-3's management, e.g. buffers."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return
    device = comm_device()
    for t in tensors:
        staged = t.data if t.device == device else t.data.to(device)
        torch.distributed.broadcast(staged, src=src)
        if staged is not t.data:
            t.data.copy_(staged)



def gather_along(x: torch.Tensor, group, size: int, dim: int = 1) -> torch.Tensor:
    """Collective over `group` (`size` ranks, activations on the communication device): every rank's `x` (same
    shape everywhere) concatenated along `dim` in rank order. Sequence parallelism's token gather."""
    import deepspeed.comm as dist

    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def sum_over(x: torch.Tensor, group) -> torch.Tensor:
    """Collective over `group`: a new tensor holding the sum of every rank's `x` (x itself is left as it is)."""
    import deepspeed.comm as dist

    total = x.contiguous().clone()
    dist.all_reduce(total, group=group)
    return total


def any_rank(flags: torch.Tensor) -> list[bool]:
    """Collective over all ranks (a no-op alone): element-wise OR of every rank's boolean flags."""
    need = flags.to(torch.int32)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        need = need.to(comm_device())
        torch.distributed.all_reduce(need, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in need.tolist()]

# ----------------------------------------------------------------------------------------------
# DeepSpeed config dicts (two builders: trainable roles and frozen roles)


def load_template(path: str, source: str, key: str, trainable: bool = False) -> dict:
    """Read a DeepSpeed JSON template: as given, else relative to the recipe, else to the source tree.
    A trainable role's template is also checked for ZeRO stage 3 (`check_train_template`)."""
    candidates = [Path(path), Path(source).parent / path, PACKAGE_ROOT / path]
    for p in candidates:
        if p.is_file():
            try:
                template = json.loads(p.read_text())
            except json.JSONDecodeError as exc:
                raise RecipeError(f"{source}: {key}: {p} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
            if trainable:
                check_train_template(template, f"{source}: {key}: {p}")
            return template
    raise RecipeError(f"{source}: {key}: DeepSpeed config template {path!r} not found")


def check_train_template(template: dict, where: str) -> None:
    """A trainable role must run ZeRO stage 3: its parameters are created already partitioned by zero.Init, which
    a lower stage would treat as whole tensors. `where` names the file and key in the one-line error."""
    stage = template.get("zero_optimization", {}).get("stage", 0)
    if stage != 3:
        raise RecipeError(f"{where}: zero_optimization.stage is {stage}; trainable roles need stage 3 (their "
                          f"parameters are partitioned when created); set \"stage\": 3")


def _fill(cfg: dict, key: str, value: Any) -> None:
    if cfg.get(key, "auto") == "auto":
        cfg[key] = value


def _common(cfg: dict, micro_batch: int, grad_accum: int, world_size: int, precision: str) -> dict:
    cfg = copy.deepcopy(cfg)
    _fill(cfg, "train_micro_batch_size_per_gpu", micro_batch)
    _fill(cfg, "gradient_accumulation_steps", grad_accum)
    _fill(cfg, "train_batch_size", micro_batch * grad_accum * world_size)
    bf16 = cfg.setdefault("bf16", {})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = precision == "bf16"
    if cfg.get("fp16", {}).get("enabled") == "auto":
        cfg["fp16"]["enabled"] = False
    return cfg


def train_ds_config(
    template: dict, *, micro_batch: int, grad_accum: int, world_size: int, precision: str, max_grad_norm: float,
    grad_reduce_dtype: str = "fp32", where: str = "training.ds_config",
) -> dict:
    """Config dict of a trainable role: ZeRO-3 with the recipe's batch arithmetic, precision, clipping and the dtype
    gradients are reduce-scattered in (DeepSpeed's `communication_data_type`; it defaults to the bf16 compute
    dtype, which rounds every rank's contribution to 8 mantissa bits before they are summed)."""
    check_train_template(template, where)
    cfg = _common(template, micro_batch, grad_accum, world_size, precision)
    # DeepSpeed 0.19 clips at 1.0 unless told otherwise; the recipe is the truth.
    _fill(cfg, "gradient_clipping", float(max_grad_norm))
    _fill(cfg, "communication_data_type", grad_reduce_dtype)
    return cfg


def eval_ds_config(
    template: dict, *, micro_batch: int, world_size: int, precision: str, offload: str, nvme_path: str | None
) -> dict:
    """Config dict of a frozen role: ZeRO-3 partitioned, no optimizer, optional parameter offload."""
    cfg = _common(template, micro_batch, 1, world_size, precision)
    cfg.pop("optimizer", None)
    cfg.pop("scheduler", None)
    zero = cfg.setdefault("zero_optimization", {})
    zero["stage"] = 3
    off = zero.get("offload_param", {})
    device = off.get("device", "auto")
    if device == "auto":
        device = offload
    if device == "none":
        zero.pop("offload_param", None)
    else:
        off["device"] = device
        if device == "nvme":
            off["nvme_path"] = nvme_path or off.get("nvme_path") or "/local_nvme"
        zero["offload_param"] = off
    return cfg


# ----------------------------------------------------------------------------------------------
# Optimizer and LR schedule


@dataclass
class OptimizerSpec:
    """What a trainable role's optimizer and schedule look like."""

    lr: float
    betas: tuple[float, float]
    weight_decay: float
    eps: float
    max_grad_norm: float
    lr_scheduler: str
    warmup_steps: int
    total_steps: int
    fused: bool = True


class LRLambda:
    """Linear warm-up then constant / linear / cosine decay (a class so the schedule state pickles)."""

    def __init__(self, kind: str, warmup: int, total: int):
        self.kind, self.warmup, self.total = kind, warmup, max(total, 1)

    def __call__(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(params: Iterable[torch.nn.Parameter], spec: OptimizerSpec) -> torch.optim.Optimizer:
    """AdamW; fused where torch supports it for the device (one pass over ZeRO's flat partition)."""
    kwargs = dict(lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps, weight_decay=spec.weight_decay)
    if spec.fused:
        kwargs["fused"] = True
    return torch.optim.AdamW([p for p in params if p.requires_grad], **kwargs)


# ----------------------------------------------------------------------------------------------
# The strategy


class Strategy:
    """Owns every DeepSpeed call of a run: model construction scope, engines, backward/step, checkpoints."""

    def __init__(self, dist: DistInfo):
        from ds_distill.parallel import SequenceParallel

        self.dist = dist
        self.sp = SequenceParallel(size=1, rank=dist.rank, world_size=dist.world_size)
        """Sequence-parallel layout (`init_sequence_parallel`); size 1: every rank is its own data-parallel rank."""

    def init_sequence_parallel(self, sp_size: int):
        """Collective: form groups of `sp_size` consecutive ranks (every rank creates every group, in order) and
        keep this rank's. Returns the layout (`self.sp`)."""
        from ds_distill.parallel import SequenceParallel

        world = self.dist.world_size
        if world % sp_size:
            raise RecipeError(f"training.sp_size: {sp_size} does not divide the world size {world}")
        group = None
        if sp_size > 1:
            import deepspeed.comm as ds_comm

            for first in range(0, world, sp_size):
                g = ds_comm.new_group(list(range(first, first + sp_size)))
                if first <= self.dist.rank < first + sp_size:
                    group = g
        self.sp = SequenceParallel(size=sp_size, rank=self.dist.rank, world_size=world, group=group)
        return self.sp

    # -- construction ---------------------------------------------------------------------------
    def zero_init(self, ds_config: dict):
        """Context in which a role's modules are created already partitioned (one scope per role)."""
        import deepspeed

        # dtype comes from the config: passing it explicitly is misread on accelerators without fp16 (0.19.8
        # turns an explicit float32 into bfloat16 on the CPU). mem_efficient_linear would replace
        # torch.nn.functional.linear process-wide with a slower autograd Function; engines built from
        # already-partitioned modules train correctly with the stock one (tested against plain PyTorch).
        return deepspeed.zero.Init(config_dict_or_path=ds_config, mem_efficient_linear=False)

    @staticmethod
    def mark_leaf_modules(module: torch.nn.Module, class_names: Iterable[str]) -> int:
        """Make ZeRO-3 gather each such submodule's parameters in one go (one hook pair per block instead
        of one per linear layer). Call before the engine is built; returns how many modules were marked."""
        from deepspeed.utils import set_z3_leaf_module

        names = set(class_names)
        marked = [m for m in module.modules() if type(m).__name__ in names]
        for m in marked:
            set_z3_leaf_module(m, True)
        return len(marked)

    @staticmethod
    def param_dtype(ds_config: dict) -> torch.dtype:
        """The dtype DeepSpeed keeps module parameters in for this config."""
        if ds_config.get("bf16", {}).get("enabled"):
            return torch.bfloat16
        if ds_config.get("fp16", {}).get("enabled"):
            return torch.float16
        return torch.float32

    @staticmethod
    def gathered(params, modifier_rank: int | None = None):
        """Gather ZeRO-3 partitioned params whole for the block; with modifier_rank, its edits are kept."""
        import deepspeed

        params = [p for p in params if hasattr(p, "ds_id")]
        if not params:
            return contextlib.nullcontext()
        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)

    def init_trainable(self, module: torch.nn.Module, ds_config: dict, spec: OptimizerSpec):
        """One engine per trainable role, with its own optimizer, LR schedule and clipping."""
        import deepspeed

        optimizer = make_optimizer(module.parameters(), spec)
        schedule = LRLambda(spec.lr_scheduler, spec.warmup_steps, spec.total_steps)
        engine, _, _, _ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=ds_config,
            dist_init_required=False,
        )
        return engine

    def init_frozen(self, module: torch.nn.Module, ds_config: dict):
        """A ZeRO-inference engine: stage 3 partitioned, no optimizer state."""
        import deepspeed

        module.requires_grad_(False)
        engine, _, _, _ = deepspeed.initialize(model=module, config=ds_config, dist_init_required=False)
        return engine

    # -- training -------------------------------------------------------------------------------
    @staticmethod
    def backward(engine, loss: torch.Tensor) -> None:
        """The role's own engine runs backward (ZeRO-3 reduce-scatters its gradients)."""
        engine.backward(loss)

    @staticmethod
    def step(engine) -> bool:
        """Optimizer step (clipping, LR schedule) of one engine; always paired with its backward. At a step
        boundary: False when DeepSpeed skipped the update because the global gradient norm was not finite (the
        same verdict on every rank: the norm is all-reduced; gradients are dropped, LR schedule not advanced)."""
        engine.step()
        return engine.was_step_applied()

    def all_finite(self, value: torch.Tensor) -> bool:
        """True on every rank iff `value` is finite on every rank (one all-reduce on the group's device)."""
        return not self._any_rank(torch.isfinite(value).all().logical_not())

    def _any_rank(self, flag: torch.Tensor) -> bool:
        """True on every rank iff the boolean `flag` is true on some rank."""
        box = flag.to(device=self.dist.device, dtype=torch.float32).reshape(1)
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(box, op=torch.distributed.ReduceOp.MAX)
        return bool(box.item() > 0)

    def grads_finite(self, engine) -> bool:
        """After backward: whether every rank's ZeRO-3 gradient partition is finite (one pass, one all-reduce). Not on
        the training path, where `step` asks DeepSpeed, whose global gradient norm already answers it."""
        opt = engine.optimizer
        if getattr(opt, "grad_partitions_flat_buffer", None) is not None:
            return not opt.has_overflow(partition_gradients=True)
        from deepspeed.utils import safe_get_local_grad

        bad = torch.zeros((), dtype=torch.bool, device=self.dist.device)
        for p in engine.module.parameters():
            g = safe_get_local_grad(p) if p.requires_grad else None
            if g is not None:
                bad |= torch.isfinite(g).all().logical_not().to(bad.device)
        return not self._any_rank(bad)

    @staticmethod
    def skip_step(engine) -> None:
        """Skip the optimizer step in progress (some micro-batch of it was non-finite): drop its gradients and move
        DeepSpeed's micro-step counter to the step's boundary, so later steps keep their accumulation boundaries."""
        engine.optimizer.zero_grad(set_to_none=True)
        ga = engine.gradient_accumulation_steps()
        engine.micro_steps = -(-engine.micro_steps // ga) * ga

    @staticmethod
    def corrupt_grads(engine) -> None:
        """Crash-test hook (DS_DISTILL_FAULT=nan_grad@N): poison this rank's gradient partition."""
        engine.optimizer.grad_partitions_flat_buffer[0] = float("nan")

    @staticmethod
    def grad_norm(engine) -> float:
        """Global gradient norm of the last step (before clipping)."""
        norm = engine.get_global_grad_norm()
        if norm is None:
            return float("nan")
        return float(norm.item() if torch.is_tensor(norm) else norm)

    @staticmethod
    def lr(engine) -> float:
        """Current learning rate of an engine."""
        return float(engine.get_lr()[0])

    # -- collectives ----------------------------------------------------------------------------
    def barrier(self) -> None:
        torch.distributed.barrier()

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a tensor over ranks (for logging), reduced on the group's device and returned on `value`'s."""
        dtype = value.dtype if value.is_floating_point() else torch.float32
        out = value.detach().to(device=self.dist.device, dtype=dtype, copy=True)
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(out)
        return (out / self.dist.world_size).to(value.device)

    @staticmethod
    def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
        """Rank `src`'s values in place on every rank (see the module-level `broadcast_tensors`)."""
        broadcast_tensors(tensors, src)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s value on every rank."""
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def gather_object(self, obj: Any, dst: int = 0) -> list | None:
        """Every rank's `obj` as a list on rank `dst`; None elsewhere."""
        if self.dist.world_size == 1:
            return [obj]
        parts = [None] * self.dist.world_size if self.dist.rank == dst else None
        torch.distributed.gather_object(obj, parts, dst=dst)
        return parts

    # -- ZeRO-3 weights seen as this rank's partitions (the EMA's view) --------------------------
    @staticmethod
    def master_partitions(module: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """This rank's fp32 master partition of every parameter (`trainable_only`: of those that require grad, e.g.
        a LoRA role's adapters), flat, in ZeRO-3 partition order (padded like `ds_tensor`): the optimizer's fp32 copy
        where there is one (read-only views: copy before the next step), else the partition itself in fp32; a module
        outside ZeRO-3 gives its whole flattened tensors."""
        out = {}
        for n, p in module.named_parameters():
            if trainable_only and not p.requires_grad:
                continue
            master = None
            if hasattr(p, "ds_tensor") and getattr(p, "_z3_optimizer", None) is not None and p.requires_grad:
                from deepspeed.utils import safe_get_local_fp32_param

                master = safe_get_local_fp32_param(p)
            if master is None:
                master = (p.ds_tensor if hasattr(p, "ds_tensor") else p.data).detach().reshape(-1).float()
            out[n] = master
        return out

    @staticmethod
    def partition_shapes(module: torch.nn.Module, trainable_only: bool = False) -> dict[str, list[int]]:
        """The whole shape of every parameter (what `master_partitions` slices)."""
        return {n: list(getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters()
                if p.requires_grad or not trainable_only}

    @contextlib.contextmanager
    def partitions_swapped_in(self, module: torch.nn.Module, partitions: dict[str, torch.Tensor]):
        """Collective: inside the block the module computes with `partitions` (this rank's flat slice of every
        parameter, as `master_partitions` gives them) cast to its parameter dtypes; afterwards the exact previous
        weights are back. Parameters ZeRO-3 keeps gathered (at or below stage3_param_persistence_threshold) get
        the whole new tensor too, assembled from every rank's slice. Parameters not in `partitions` are untouched."""
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for n, p in module.named_parameters():
                    new = partitions.get(n)
                    if new is None:
                        continue
                    if not hasattr(p, "ds_tensor"):
                        saved.append((p.data, p.data.clone()))
                        p.data.copy_(new.reshape(p.shape))
                        continue
                    local = p.ds_tensor
                    saved.append((local, local.clone()))
                    local.copy_(new.reshape(local.shape))
                    if p.ds_status == ZeroParamStatus.AVAILABLE:  # kept whole on every rank: write the whole
                        saved.append((p.data, p.data.clone()))
                        p.data.copy_(self._all_gather_flat(new, p.ds_process_group)[: p.ds_numel].view(p.ds_shape))
            yield
        finally:
            with torch.no_grad():
                for target, value in reversed(saved):
                    target.copy_(value)

    def _all_gather_flat(self, part: torch.Tensor, group=None) -> torch.Tensor:
        """Every rank's equal-size flat `part`, concatenated in rank order (on `part`'s device)."""
        world = torch.distributed.get_world_size(group) if torch.distributed.is_initialized() else 1
        if world == 1:
            return part.reshape(-1)
        staged = part.detach().reshape(-1).to(self.dist.device)
        out = torch.empty(world * staged.numel(), dtype=staged.dtype, device=self.dist.device)
        torch.distributed.all_gather_into_tensor(out, staged, group=group)
        return out.to(part.device)

    # -- checkpoints ----------------------------------------------------------------------------
    @staticmethod
    def has_frozen(engine) -> bool:
        """Whether the engine's module has frozen parameters (a LoRA role: its base, read from the role's path)."""
        return any(not p.requires_grad for p in engine.module.parameters())

    @staticmethod
    def save(engine, save_dir: str | os.PathLike, tag: str, client_state: dict) -> None:
        """Collective: every rank writes its partition of `tag` under `save_dir`. Frozen parameters (a LoRA role's
        base) are left out: the checkpoint holds the trained weights and their optimizer state only."""
        engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=Strategy.has_frozen(engine))
        peft_config = getattr(engine.module, "peft_config", None)
        if peft_config and torch.distributed.get_rank() == 0:
            from ds_distill.utils.module_state import LORA_CONFIG_FILE

            config = peft_config["default"].to_dict()
            (Path(save_dir) / tag / LORA_CONFIG_FILE).write_text(json.dumps(config, indent=2, default=sorted) + "\n")

    @staticmethod
    def load(engine, load_dir: str | os.PathLike, tag: str) -> dict:
        """Collective: restore module, optimizer and LR schedule; returns the saved client state. Frozen parameters
        keep the values the role was built with (a checkpoint without them is not strict about the module)."""
        path, client_state = engine.load_checkpoint(
            str(load_dir), tag=tag, load_module_strict=not Strategy.has_frozen(engine), load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            from ds_distill.errors import CheckpointError

            raise CheckpointError(f"{load_dir}/{tag}: DeepSpeed could not load this checkpoint")
        return client_state or {}

    def to_universal(self, src: Path, dst: Path) -> None:
        """Collective: rank 0 turns a ZeRO-3 role folder into DeepSpeed's universal (rank-count-free) format
        under `dst` (written aside, then renamed); every rank waits for it."""
        if self.dist.is_main and not dst.is_dir():
            import argparse
            import shutil

            from deepspeed.checkpoint import ds_to_universal

            tmp = dst.parent / f".tmp-{dst.name}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            ds_to_universal.main(argparse.Namespace(
                input_folder=str(src), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
                keep_temp_folder=False, strict=True, inject_missing_state=False))
            os.rename(tmp, dst)
        self.barrier()

    def close(self) -> None:
        """Leave the process group cleanly."""
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

"""A ZeRO-3 checkpoint -> a Diffusers safetensors directory, streamed (`tools/convert_zero_to_safetensors.py`).

    python tools/convert_zero_to_safetensors.py CHECKPOINT OUT [--role student] [--dtype fp32|bf16|fp16]
        [--max-shard-size 5GB] [--ema] [--base MODEL_DIR [--link-base]] [--lora | --merge] [--overwrite]

CHECKPOINT is a `checkpoint-<step>` folder, a role folder inside one, or a training `output_dir` (meaning its
newest complete checkpoint). OUT gets `transformer/` (config.json plus safetensors shards named as diffusers
names them); with `--base` it also gets the base pipeline's other components, so `WanPipeline.from_pretrained(OUT)`
loads it. The weights are DeepSpeed's fp32 master partitions (`--ema`: the EMA partitions), reassembled exactly
as DeepSpeed's own `zero_to_fp32` does, then cast to `--dtype`. fp32 and bf16 runs convert alike (a bf16 run's
optimizer files are DeepSpeed's `bf16_zero_pp_rank_*`; its master weights are fp32 all the same).

A LoRA role's checkpoint holds its adapters only (and `lora_config.json`, the peft config). `--lora` writes them
as a Diffusers LoRA file, `OUT/pytorch_lora_weights.safetensors` (diffusers' `get_peft_model_state_dict` and
`WanPipeline.save_lora_weights`, with the adapter config as metadata), which `WanPipeline.load_lora_weights(OUT)`
loads onto the base model. `--merge` writes full weights with the adapters folded in (diffusers' `fuse_lora` on the
base transformer, read from --base or the role's path in recipe.yaml), laid out as a plain export; it holds the
whole base model in fp32 in memory while it merges.

A role whose module holds several transformers (a family's experts) is written where its family says
(`export_components`: a pipeline folder per name prefix), each folder with its config from the base; a part the run
kept frozen (`roles.<name>.experts`) is not in the checkpoint and is copied from the base model (--base, else the
role's path). With --base, OUT also gets the base's model_index.json, so the pipeline loads the parts as before.

OUT is written aside and renamed into place whole. A non-empty OUT is refused unless `--overwrite`, which replaces
only an earlier export (its shards carry the `ds_distill_export` metadata mark), and only once the new one is
complete; the old one is removed after the swap.

Memory: every rank's partition file is memory-mapped; each parameter is copied out of its per-rank slices and
the mapped pages under those slices are given back at once, so peak memory is one output shard plus one
parameter, whatever the model size or rank count. The Adam moments in the same files are never read.

Trust: DeepSpeed's `*_states.pt` files are Python pickles, and unpickling can run code the file names. Convert
only checkpoints that your own runs wrote (or that you would trust as you trust a script).
"""
from __future__ import annotations

import argparse
import bisect
import ctypes
import json
import math
import mmap
import os
import re
import shutil
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ds_distill.errors import CheckpointError, UserError, exit_on_user_error
from ds_distill.utils import checkpoint as ckpt

if TYPE_CHECKING:
    import torch

# torch is imported only once weights are read, so a wrong path or flag is reported at once.
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
"""The file name diffusers' save_lora_weights / load_lora_weights use by default."""
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
EMA_DIR = "ema"
MARK = "ds_distill_export"
"""Metadata key of every shard we write: the checkpoint it came from. `--overwrite` replaces only such folders."""
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def parse_size(text: str) -> int:
    """`5GB` -> 5_000_000_000 (decimal units, as huggingface uses them); `512MiB`, `100000` work too."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(text).upper())
    if not m or m.group(2) in ("IB",):
        raise UserError(f"--max-shard-size: {text!r} is not a size (use e.g. 5GB, 500MB, 2GiB)")
    size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2) or ""])
    if size <= 0:
        raise UserError(f"--max-shard-size: {text!r} must be positive")
    return size


# -- finding the role's files ---------------------------------------------------------------------------------
@dataclass
class RoleCheckpoint:
    """One trainable role of a complete ds_distill checkpoint, with its rank files checked to be there."""

    checkpoint: Path
    role: str
    world_size: int
    step: int
    optim_prefix: str = ""
    """DeepSpeed prefixes a bf16 run's optimizer files with `bf16_` (the model-states files keep their name)."""

    @property
    def role_dir(self) -> Path:
        return self.checkpoint / self.role

    def model_file(self, rank: int) -> Path:
        return self.role_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"

    def optim_file(self, rank: int) -> Path:
        return self.role_dir / f"{self.optim_prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"

    def ema_file(self, rank: int) -> Path:
        return self.role_dir / EMA_DIR / f"rank-{rank:05d}-of-{self.world_size:05d}.safetensors"


_RANK_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt$")


def locate(path: str | os.PathLike, role: str | None = None) -> RoleCheckpoint:
    """Resolve CHECKPOINT (checkpoint-<step>, a role folder in it, or an output_dir) and check its files."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path}: is a file; expected a checkpoint-<step> folder, a role folder in one, "
                              "or a training output_dir")
    if (path / ckpt.STATE_FILE).exists():
        folder = path
    elif (path.parent / ckpt.STATE_FILE).exists():
        if role is not None and role != path.name:
            raise CheckpointError(f"{path}: is the {path.name!r} role folder, but --role {role} was asked for")
        folder, role = path.parent, path.name
    elif (path / ckpt.LATEST_FILE).is_file() or any(path.glob("checkpoint-*")):
        found = ckpt.find_resume_checkpoint(path, "latest")
        if found is None:
            raise CheckpointError(f"{path}: holds no complete checkpoint (checkpoint-<step> folders with "
                                  f"{ckpt.STATE_FILE}); was every save interrupted?")
        folder = found
    elif any(path.glob("*zero_pp_rank_*_states.pt")) or any(path.glob("*/*zero_pp_rank_*_states.pt")):
        raise CheckpointError(f"{path}: has DeepSpeed files but no {ckpt.STATE_FILE}: an interrupted save or not "
                              "a ds_distill checkpoint; convert a complete checkpoint-<step> folder")
    else:
        raise CheckpointError(f"{path}: is not a ds_distill checkpoint (no {ckpt.STATE_FILE}) nor a training "
                              "output_dir (no `latest`, no checkpoint-<step>)")
    if not ckpt.is_complete(folder):
        raise CheckpointError(f"{folder}: {ckpt.STATE_FILE} is unreadable or not marked complete (an interrupted "
                              "save?)")
    state = ckpt.read_state(folder)
    role = role or "student"
    roles = list(state.get("roles", []))
    if role not in roles:
        raise CheckpointError(f"{folder}: has no trainable role {role!r} (it holds {', '.join(roles) or 'none'}); "
                              "pick one with --role")
    world = int(state.get("world_size", 0))
    found = RoleCheckpoint(folder, role, world, int(state.get("step", -1)))
    _check_rank_files(found)
    return found


def _check_rank_files(rc: RoleCheckpoint) -> None:
    d = rc.role_dir
    if not d.is_dir():
        raise CheckpointError(f"{d}: role folder is missing (the checkpoint is incomplete)")
    names = [m for m in (_RANK_FILE.match(p.name) for p in d.iterdir()) if m]
    if not names:
        raise CheckpointError(f"{d}: is not a DeepSpeed ZeRO-3 checkpoint folder (no zero_pp_rank_*_states.pt)")
    if any(m.group(3) != "00" for m in names):
        raise CheckpointError(f"{d}: holds model-parallel files (mp_rank > 00), which this converter does not merge")
    if rc.world_size < 1:
        raise CheckpointError(f"{rc.checkpoint / ckpt.STATE_FILE}: no world_size recorded")
    prefixes = {m.group(1) or "" for m in names if m.group(4) == "optim"}
    if len(prefixes) > 1:
        raise CheckpointError(f"{d}: holds both bf16_zero_pp_rank_* and zero_pp_rank_* optimizer files (files of a "
                              "bf16 and an fp32 run mixed); convert a checkpoint folder that one run wrote")
    rc.optim_prefix = prefixes.pop() if prefixes else ""
    ranks = {int(m.group(2)) for m in names}
    if max(ranks) >= rc.world_size:
        raise CheckpointError(f"{d}: holds files of rank {max(ranks)}, but the checkpoint says it was written by "
                              f"{rc.world_size} ranks")
    for r in range(rc.world_size):
        for f in (rc.model_file(r), rc.optim_file(r)):
            if not f.is_file():
                raise CheckpointError(f"{d}: {f.name} is missing (the checkpoint was written by {rc.world_size} "
                                      "ranks; every rank's files are needed)")


# -- reading partitions without holding them --------------------------------------------------------------------
class _PageDropper:
    """Gives back the file-backed pages under tensors we finished copying (Linux madvise; elsewhere a no-op).

    Only ranges inside a mapping of one of our checkpoint files are touched: MADV_DONTNEED on anonymous memory
    would zero it, so the mappings are looked up in /proc/self/maps rather than assumed.
    """

    MADV_DONTNEED = 4

    def __init__(self, files: list[Path]):
        self.page = mmap.PAGESIZE
        self.regions: list[tuple[int, int]] = []
        self.madvise = None
        if not sys.platform.startswith("linux"):
            return
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self.madvise = libc.madvise
        except (OSError, AttributeError):
            return
        self.files = {str(Path(f).resolve()) for f in files}

    def refresh(self) -> None:
        """Re-read our files' mappings (call after opening them)."""
        if self.madvise is None:
            return
        regions = []
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6 and parts[5].rstrip("\n") in self.files:
                        lo, hi = parts[0].split("-")
                        regions.append((int(lo, 16), int(hi, 16)))
        except OSError:
            regions = []
        self.regions = sorted(regions)

    def drop(self, t: torch.Tensor) -> None:
        if self.madvise is None or t.numel() == 0 or not self.regions:
            return
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        i = bisect.bisect_right(self.regions, (start, float("inf"))) - 1
        if i < 0 or not (self.regions[i][0] <= start and end <= self.regions[i][1]):
            return
        lo = start - start % self.page
        hi = min(-(-end // self.page) * self.page, self.regions[i][1])
        self.madvise(lo, hi - lo, self.MADV_DONTNEED)


def _torch_load(path: Path):
    """mmap'd load of a DeepSpeed pickle (tensors stay on disk until sliced). Trusted files only: see module doc."""
    import torch

    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as exc:  # truncated, corrupt, not a torch zip file: all the same to the user
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {msg})") from None


def _map_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Memory-map a safetensors file: {name: tensor view}, metadata. Nothing is read until a view is used."""
    import torch

    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private, so views are writable
        metadata = header.pop("__metadata__", None) or {}
        out = {}
        for name, info in header.items():
            dtype = getattr(torch, _ST_DTYPES[info["dtype"]])
            begin, end = info["data_offsets"]
            count = (end - begin) // dtype.itemsize
            flat = (torch.frombuffer(mm, dtype=dtype, count=count, offset=8 + n + begin) if count
                    else torch.empty(0, dtype=dtype))
            out[name] = flat.view(info["shape"])
        return out, metadata
    except (OSError, ValueError, KeyError, struct.error, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None


@dataclass
class _Tensor:
    """One output tensor: the 1-D file-backed pieces whose concatenation, cut to numel, is the tensor."""

    name: str
    shape: tuple[int, ...]
    pieces: list[torch.Tensor] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def src_dtype(self) -> torch.dtype:
        import torch

        return self.pieces[0].dtype if self.pieces else torch.float32

    def out_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype if self.src_dtype.is_floating_point else self.src_dtype


def _flat_range(groups: list[torch.Tensor], offset: int, length: int) -> list[torch.Tensor]:
    """Views of [offset, offset+length) of the virtual concatenation of one rank's flat fp32 groups."""
    views, start = [], 0
    for g in groups:
        end = start + g.numel()
        lo, hi = max(offset, start), min(offset + length, end)
        if lo < hi:
            views.append(g[lo - start:hi - start])
        start = end
    return views


class PartitionedRole:
    """A role's weights as DeepSpeed left them: per-rank fp32 partitions (or EMA partitions), memory-mapped."""

    def __init__(self, rc: RoleCheckpoint, ema: bool = False):
        self.rc = rc
        self.ema = ema
        files = [rc.model_file(r) for r in range(rc.world_size)] + [rc.optim_file(r) for r in range(rc.world_size)]
        if ema:
            self._check_ema_files()
            files = files[:rc.world_size] + [rc.ema_file(r) for r in range(rc.world_size)]
        self.pages = _PageDropper(files)
        self.tensors = self._layout()
        self.pages.refresh()

    def _check_ema_files(self) -> None:
        rc = self.rc
        ema_dir = rc.role_dir / EMA_DIR
        if not ema_dir.is_dir():
            raise CheckpointError(f"{rc.role_dir}: has no EMA weights ({EMA_DIR}/); they exist only for a student "
                                  "trained with method_config.ema_decay > 0")
        for r in range(rc.world_size):
            if not rc.ema_file(r).is_file():
                have = sorted(p.name for p in ema_dir.glob("*.safetensors"))
                raise CheckpointError(f"{ema_dir}: {rc.ema_file(r).name} is missing "
                                      f"(have: {', '.join(have) or 'none'})")

    def _layout(self) -> list[_Tensor]:
        rc, world = self.rc, self.rc.world_size
        models = [_torch_load(rc.model_file(r)) for r in range(world)]
        m0 = models[0]
        for key in ("param_shapes", "buffer_names", "module"):
            if key not in m0:
                raise CheckpointError(f"{rc.model_file(0)}: not a DeepSpeed model-states file (no {key!r})")
        param_shapes = {k: tuple(v) for group in m0["param_shapes"] for k, v in group.items()}
        frozen_shapes = {k: tuple(v) for k, v in (m0.get("frozen_param_shapes") or {}).items()}
        tensors: dict[str, _Tensor] = {}

        if self.ema:
            ema = self._ema_pieces(set(param_shapes) | set(frozen_shapes))
            for name, shape in {**param_shapes, **frozen_shapes}.items():
                tensors[name] = _Tensor(name, shape, ema[name])
        else:
            groups = []
            for r in range(world):
                osd = _torch_load(rc.optim_file(r)).get("optimizer_state_dict", {})
                stage, count = osd.get("zero_stage"), osd.get("partition_count")
                if stage is None or "fp32_flat_groups" not in osd:
                    raise CheckpointError(f"{rc.optim_file(r)}: not a DeepSpeed ZeRO optimizer-states file")
                if int(stage) != 3:
                    raise CheckpointError(f"{rc.optim_file(r)}: is a ZeRO stage {int(stage)} checkpoint; "
                                          "this converter reads ZeRO-3 checkpoints")
                count = max(count) if isinstance(count, list) else int(count)
                if count != world:
                    raise CheckpointError(f"{rc.optim_file(r)}: partitioned over {count} ranks, but "
                                          f"{rc.checkpoint / ckpt.STATE_FILE} says {world}")
                groups.append(list(osd["fp32_flat_groups"]))  # the Adam moments beside them stay unread
            offset = 0
            for name, shape in param_shapes.items():
                part = math.ceil(math.prod(shape) / world)
                pieces = [v for r in range(world) for v in _flat_range(groups[r], offset, part)]
                tensors[name] = _Tensor(name, shape, pieces)
                offset += part
            have = sum(g.numel() for g in groups[0])
            if offset != have:
                raise CheckpointError(f"{rc.optim_file(0)}: holds {have} partitioned values, the parameter shapes "
                                      f"need {offset}; the model-states and optimizer files do not belong together")
            for name, shape in frozen_shapes.items():
                frags = [m.get("frozen_param_fragments", {}).get(name) for m in models]
                if any(f is None for f in frags):
                    raise CheckpointError(f"{rc.role_dir}: frozen parameter {name!r} lacks a fragment on some rank")
                tensors[name] = _Tensor(name, shape, [f.reshape(-1) for f in frags])

        module = m0["module"]
        for name in m0["buffer_names"]:
            if name in module:
                buf = module[name]
                tensors[name] = _Tensor(name, tuple(buf.shape), [buf.reshape(-1)])
        for alias, source in (m0.get("shared_params") or {}).items():
            if source in tensors:
                tensors[alias] = _Tensor(alias, tensors[source].shape, tensors[source].pieces)
        for t in tensors.values():
            if sum(p.numel() for p in t.pieces) < t.numel:
                raise CheckpointError(f"{rc.role_dir}: the partitions of {t.name!r} hold fewer values than its shape "
                                      f"{list(t.shape)} needs")
        for name in (frozen_shapes if not self.ema else {**param_shapes, **frozen_shapes}):
            # one piece per rank, each ceil(numel / world) long: anything else would misplace values silently
            want = math.ceil(tensors[name].numel / world)
            if any(p.numel() != want for p in tensors[name].pieces):
                raise CheckpointError(f"{rc.role_dir}: the per-rank partitions of {name!r} are not {want} values "
                                      f"each, as {world} ranks would have written them")
        return list(tensors.values())

    def _ema_pieces(self, names: set[str]) -> dict[str, list[torch.Tensor]]:
        rc = self.rc
        per_rank = []
        for r in range(rc.world_size):
            tensors, _ = _map_safetensors(rc.ema_file(r))
            if set(tensors) != names:
                odd = sorted(set(tensors) ^ names)[0]
                raise CheckpointError(f"{rc.ema_file(r)}: its tensors do not match the role's parameters "
                                      f"(e.g. {odd!r})")
            per_rank.append(tensors)
        return {n: [per_rank[r][n].reshape(-1) for r in range(rc.world_size)] for n in names}

    def assemble(self, t: _Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The full tensor in `dtype` (floating tensors only), its source pages given back as they are copied."""
        import torch

        out = torch.empty(t.numel, dtype=t.out_dtype(dtype))
        pos = 0
        for piece in t.pieces:
            n = min(piece.numel(), t.numel - pos)
            if n > 0:
                out[pos:pos + n].copy_(piece[:n])
                pos += n
            self.pages.drop(piece)
        return out.view(t.shape)


# -- the transformer config and the output layout ---------------------------------------------------------------
def run_recipe(rc: RoleCheckpoint) -> tuple[Path, dict | None]:
    """The run's recipe.yaml beside the checkpoint, read once (None when there is none); unreadable: a UserError."""
    recipe = rc.checkpoint.parent / "recipe.yaml"
    if not recipe.is_file():
        return recipe, None
    import yaml

    try:
        data = yaml.safe_load(recipe.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{recipe}: cannot read the run's recipe ({type(exc).__name__}); restore it from the run's "
                        "launch recipe, or pass --base for the transformer config") from None
    if not isinstance(data, dict):
        raise UserError(f"{recipe}: not a recipe mapping; restore it from the run's launch recipe")
    return recipe, data


def transformer_config_file(rc: RoleCheckpoint, base: Path | None, run: tuple[Path, dict | None]) -> Path:
    """--base's transformer/config.json, else the one of the role's `path` in the run's recipe.yaml (`run`)."""
    if base is not None:
        base = Path(base)
        if not (base / "model_index.json").is_file() or not (base / "transformer" / "config.json").is_file():
            raise UserError(f"--base {base}: is not a Diffusers pipeline directory (needs model_index.json and "
                            "transformer/config.json)")
        return base / "transformer" / "config.json"
    recipe, data = run
    hint = "pass --base MODEL_DIR (the pipeline the run started from)"
    if data is None:
        raise UserError(f"{rc.checkpoint}: no --base given and no {recipe.name} beside the checkpoint to find the "
                        f"transformer config in; {hint}")
    try:
        path = data["roles"][rc.role]["path"]
    except (KeyError, TypeError):
        raise UserError(f"{recipe}: has no roles.{rc.role}.path to read the transformer config from; {hint}") from None
    p = Path(os.path.expanduser(str(path)))
    for candidate in ([p] if p.is_absolute() else [p, recipe.parent / p]):
        for cfg in (candidate / "transformer" / "config.json", candidate / "config.json"):
            if cfg.is_file():
                return cfg
    if str(path).count("/") == 1 and not str(path).startswith((".", "/", "~")) and \
            os.environ.get("HF_HUB_OFFLINE", "0") != "1":
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(str(path), "config.json", subfolder="transformer"))
        except Exception as exc:  # offline, auth, no such repo
            raise UserError(f"{recipe}: roles.{rc.role}.path {path!r} is not a local folder and its config could "
                            f"not be fetched ({type(exc).__name__}); {hint}") from None
    raise UserError(f"{recipe}: roles.{rc.role}.path {path!r} has no transformer/config.json here; {hint}")


def expected_state(config: dict) -> dict[str, tuple[int, ...]] | None:
    """Names and shapes the config's diffusers class expects (built on the meta device: no memory)."""
    try:
        import diffusers
        import torch

        cls = getattr(diffusers, str(config.get("_class_name", "")), None)
        if cls is None:
            return None
        with torch.device("meta"):
            model = cls.from_config(config)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}
    except Exception:  # an unknown class or a config this diffusers cannot build: skip the check, not the export
        return None


def check_against_config(tensors: list[_Tensor], expected: dict[str, tuple[int, ...]], where: str,
                         config_file: Path) -> None:
    have = {t.name: t.shape for t in tensors}
    problems = [f"{k!r} is {list(have[k])}, the config wants {list(v)}" for k, v in expected.items()
                if k in have and tuple(have[k]) != tuple(v)]
    problems += [f"{k!r} is missing" for k in expected if k not in have]
    problems += [f"{k!r} is not in the model" for k in have if k not in expected]
    if problems:
        raise CheckpointError(f"{where}: does not fit the transformer config {config_file}: {problems[0]} "
                              f"({len(problems)} problem{'s' if len(problems) > 1 else ''})")


def plan_shards(tensors: list[_Tensor], dtype: torch.dtype, max_bytes: int) -> list[list[_Tensor]]:
    """Consecutive groups of at most max_bytes (a tensor larger than that gets a shard of its own)."""
    shards: list[list[_Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel * t.out_dtype(dtype).itemsize
        if not shards or (size + nbytes > max_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def shard_name(i: int, n: int) -> str:
    return WEIGHTS_NAME if n == 1 else WEIGHTS_NAME.replace(".safetensors", f"-{i + 1:05d}-of-{n:05d}.safetensors")


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def write_transformer(role, tensors: list[_Tensor], out: Path, dtype: torch.dtype,
                      max_bytes: int, log=print, source: str | None = None) -> tuple[int, int]:
    """Write the shards (each assembled by `role.assemble`, saved, freed in turn) and the index; returns
    (shards, bytes). `source` (default: the role folder) is recorded in every shard's metadata."""
    from safetensors.torch import save_file

    source = source or f"{role.rc.role_dir}{' EMA' if role.ema else ''}"

    shards = plan_shards(tensors, dtype, max_bytes)
    weight_map, total = {}, 0
    for i, group in enumerate(shards):
        name = shard_name(i, len(shards))
        data = {t.name: role.assemble(t, dtype) for t in group}
        nbytes = sum(v.numel() * v.element_size() for v in data.values())
        save_file(data, str(out / name), metadata={"format": "pt", MARK: source})
        del data
        weight_map.update({t.name: name for t in group})
        total += nbytes
        if len(shards) > 1:
            log(f"  {name}: {len(group)} tensors, {_human(nbytes)}")
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return len(shards), total


def copy_base(base: Path, out: Path, link: bool, skip: tuple[str, ...]) -> list[str]:
    """The base pipeline's components except the folders of its transformer(s), `skip` (copied, or symlinked with
    link=True)."""
    names = []
    for entry in sorted(Path(base).iterdir()):
        if entry.name in skip or entry.name.startswith("."):
            continue
        target = out / entry.name
        if link:
            target.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
        elif entry.is_dir():
            shutil.copytree(entry, target)
        else:
            shutil.copy2(entry, target)
        names.append(entry.name)
    return names


# -- LoRA checkpoints ---------------------------------------------------------------------------------------------
def lora_config_of(rc: RoleCheckpoint) -> dict | None:
    """The peft config a LoRA role's checkpoint was saved with (None: a role trained in full)."""
    from ds_distill.utils.module_state import LORA_CONFIG_FILE

    path = rc.role_dir / LORA_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable LoRA config ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("r"), int):
        raise CheckpointError(f"{path}: not a peft LoraConfig (no rank `r`)")
    return config


def adapter_model(transformer_config: dict, lora: dict, base_dir: Path | None = None):
    """The transformer with the adapters of `lora` added by diffusers' `add_adapter`: on the meta device (no memory)
    without `base_dir`, else with the base weights of `base_dir` in fp32."""
    import torch
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig

    config = LoraConfig.from_peft_type(**lora)
    if base_dir is None:
        with torch.device("meta"):
            model = WanTransformer3DModel.from_config({k: v for k, v in transformer_config.items()
                                                       if not k.startswith("_")})
            model.add_adapter(config)
    else:
        model = WanTransformer3DModel.from_pretrained(str(base_dir), torch_dtype=torch.float32)
        model.add_adapter(config)
    return model


def load_adapters(model, role: PartitionedRole, tensors: list[_Tensor], where: str, assign: bool) -> None:
    """Put the checkpoint's adapter tensors (fp32) into `model`, whose adapter names they must match exactly."""
    import torch

    from ds_distill.utils.module_state import lora_parameter_names

    want = set(lora_parameter_names(model))
    have = {t.name for t in tensors}
    if want != have:
        odd = sorted(want ^ have)[0]
        raise CheckpointError(f"{where}: its adapters do not match those its lora_config.json gives this transformer "
                              f"(e.g. {odd!r})")
    for t in tensors:
        if tuple(model.get_parameter(t.name).shape) != tuple(t.shape):
            raise CheckpointError(f"{where}: {t.name} is {list(t.shape)} in the checkpoint but "
                                  f"{list(model.get_parameter(t.name).shape)} here: the base model is another size "
                                  "than the one the run trained; pass that model as --base")
    state = {t.name: role.assemble(t, torch.float32) for t in tensors}
    unexpected = model.load_state_dict(state, strict=False, assign=assign).unexpected_keys
    if unexpected:
        raise CheckpointError(f"{where}: {unexpected[0]!r} is not a parameter of the model")


def write_lora(model, out: Path, dtype: torch.dtype, source: str) -> tuple[int, int]:
    """The adapters as a Diffusers LoRA file (`LORA_WEIGHTS_NAME`), through peft's `get_peft_model_state_dict` and
    `WanPipeline.save_lora_weights`, with the adapter config as metadata; returns (tensors, bytes)."""
    from diffusers import WanPipeline
    from peft.utils import get_peft_model_state_dict

    state = {k: v.to(dtype).contiguous() for k, v in get_peft_model_state_dict(model).items()}
    metadata = model.peft_config["default"].to_dict()
    metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in metadata.items()}
    WanPipeline.save_lora_weights(str(out), transformer_lora_layers=state, weight_name=LORA_WEIGHTS_NAME,
                                  transformer_lora_adapter_metadata=metadata)
    (out / f"{MARK}.json").write_text(json.dumps({"source": source}) + "\n")
    return len(state), sum(v.numel() * v.element_size() for v in state.values())


class _InMemory:
    """A state dict seen as the converter's roles are (`assemble`), for writing merged weights."""

    def __init__(self, state: dict):
        self.state = state

    def tensors(self) -> list[_Tensor]:
        return [_Tensor(n, tuple(v.shape)) for n, v in self.state.items()]

    def assemble(self, t: _Tensor, dtype: torch.dtype) -> torch.Tensor:
        v = self.state[t.name]
        return v.to(dtype if v.is_floating_point() else v.dtype).contiguous()


def base_weights_dir(config_file: Path, where: str) -> Path:
    """The base transformer folder (beside its config.json) that --merge reads, checked to hold weights."""
    folder = config_file.parent
    if not any(folder.glob("*.safetensors")):
        raise UserError(f"{where}: --merge needs the base weights, and {folder} has no .safetensors; pass --base "
                        "MODEL_DIR (the pipeline the run started from)")
    return folder


def is_export(folder: Path) -> bool:
    """True if `folder` is an export this converter wrote: its transformer/ holds config.json and safetensors
    shards that carry our mark, or it is a LoRA export (our mark file beside the LoRA file). A model folder from
    anywhere else is never replaced by --overwrite."""
    if (Path(folder) / LORA_WEIGHTS_NAME).is_file() and (Path(folder) / f"{MARK}.json").is_file():
        return True
    if not (Path(folder) / "transformer" / "config.json").is_file():
        return False
    # A role of several transformers whose first stayed frozen has the base's transformer/ beside folders we wrote.
    return any(_marked(sub) for sub in sorted(Path(folder).iterdir()) if sub.is_dir())


def _marked(folder: Path) -> bool:
    """Every safetensors shard in `folder` (at least one) carries our mark."""
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        return False
    for shard in shards:
        try:
            with open(shard, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                meta = json.loads(f.read(min(n, 100_000_000))).get("__metadata__") or {}
        except (OSError, ValueError, struct.error, AttributeError):
            return False
        if MARK not in meta:
            return False
    return True


def role_family(rc: RoleCheckpoint, run: tuple[Path, dict | None]):
    """The role's model family, as the run's recipe.yaml (`run`) names it (roles.<role>.family, else
    recipe.family), which says where the role's tensors go (`export_components`). Without a recipe.yaml (a
    checkpoint copied without it): `wan`, the built-in family. A recipe that names no family: a UserError."""
    from ds_distill.dispatch import get_family

    recipe, data = run
    if data is None:
        return get_family("wan", str(recipe), "recipe.family")()
    role, head = (data.get("roles") or {}).get(rc.role), data.get("recipe")
    if isinstance(role, dict) and role.get("family"):
        name, key = role["family"], f"roles.{rc.role}.family"
    else:
        name, key = (head.get("family") if isinstance(head, dict) else None), "recipe.family"
    if not name:
        raise UserError(f"{recipe}: names no model family (recipe.family) for role {rc.role}; restore it from the "
                        "run's launch recipe")
    return get_family(str(name), str(recipe), key)()


def split_components(tensors: list[_Tensor], layout: dict[str, str]) -> dict[str, list[_Tensor]]:
    """A role's tensors by pipeline folder: under `folder`, those named `prefix + name`, as `name` (`layout`:
    {folder: prefix}, the family's `export_components`). A folder with none is a part the run kept frozen."""
    return {folder: [_Tensor(t.name[len(prefix):], t.shape, t.pieces) for t in tensors if t.name.startswith(prefix)]
            for folder, prefix in layout.items()}


# -- the command ------------------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    """What convert() wrote."""

    out: Path
    checkpoint: Path
    role: str
    ema: bool
    num_tensors: int
    num_params: int
    num_shards: int
    nbytes: int
    components: list[str]


def convert(checkpoint: str | os.PathLike, out: str | os.PathLike, role: str | None = None, dtype: str = "fp32",
            max_shard_size: str | int = "5GB", ema: bool = False, base: str | os.PathLike | None = None,
            link_base: bool = False, overwrite: bool = False, lora: bool = False, merge: bool = False,
            log=print) -> ExportResult:
    """Convert one role of a ZeRO-3 checkpoint into OUT (see the module docstring); all-or-nothing."""
    from ds_distill.cli import check_output_dir

    if dtype not in DTYPES:
        raise UserError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if lora and merge:
        raise UserError("--lora and --merge: pick one (the adapters alone, or full weights with them folded in)")
    if lora and link_base:
        raise UserError("--link-base: a --lora export holds the adapters only; drop --base/--link-base")
    max_bytes = max_shard_size if isinstance(max_shard_size, int) else parse_size(max_shard_size)
    out = check_output_dir(out, "OUT", overwrite, swap=True, replaceable=is_export,
                           what="an export this converter wrote")
    rc = locate(checkpoint, role)
    for keep, what in ((rc.checkpoint, "the checkpoint"), (Path(base) if base is not None else None, "--base")):
        if keep is not None and (out.resolve() == keep.resolve() or out.resolve() in keep.resolve().parents
                                 or keep.resolve() in out.resolve().parents):
            raise UserError(f"{out}: OUT must be outside {what} ({keep}), not in it or around it")
    run = run_recipe(rc)
    config_file = transformer_config_file(rc, Path(base) if base is not None else None, run)
    family = role_family(rc, run)
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{config_file}: cannot read the transformer config ({exc})") from None
    lora_cfg = lora_config_of(rc)
    if lora_cfg is None and (lora or merge):
        raise UserError(f"{rc.role_dir}: holds full weights, not LoRA adapters; export it without "
                        f"{'--lora' if lora else '--merge'}")
    if lora_cfg is not None and not (lora or merge):
        raise UserError(f"{rc.role_dir}: holds LoRA adapters only (the base stays in the role's model folder); "
                        "export them with --lora (a Diffusers LoRA file) or --merge (full weights, adapters folded in)")
    base_dir = base_weights_dir(config_file, str(rc.role_dir)) if merge else None
    import torch

    role_w = PartitionedRole(rc, ema=ema)
    tensors = role_w.tensors
    where = str(rc.role_dir) + (" (EMA)" if ema else "")
    adapters = None
    if lora_cfg is not None:
        adapters = adapter_model(config, lora_cfg, base_dir)
        load_adapters(adapters, role_w, tensors, where, assign=base_dir is None)
        if merge:
            adapters.fuse_lora(lora_scale=1.0)
            adapters.unload_lora()
            role_w = _InMemory(adapters.state_dict())
            tensors = role_w.tensors()
            adapters = None
    layout = family.export_components([t.name for t in tensors]) if lora_cfg is None else None
    parts = split_components(tensors, layout) if layout is not None else None
    part_configs: dict[str, Path] = {}
    if parts is not None:
        pipeline = config_file.parent.parent
        for folder, group in parts.items():
            part_configs[folder] = pipeline / folder / "config.json"
            if not part_configs[folder].is_file() or (not group
                                                      and not list((pipeline / folder).glob("*.safetensors"))):
                what = "a config.json" if group else "a config.json and weights"
                raise UserError(f"{pipeline}: has no {folder}/ with {what}; {rc.role_dir} holds a role of "
                                f"{len(parts)} transformers: pass --base, the pipeline the run started from")
        for folder, group in parts.items():
            want = expected_state(json.loads(part_configs[folder].read_text())) if group else None
            if want is not None:
                check_against_config(group, want, f"{where} ({folder}/)", part_configs[folder])
                order = {k: i for i, k in enumerate(want)}
                parts[folder] = sorted(group, key=lambda t: order[t.name])
    expected = None if lora or parts is not None else expected_state(config)
    if expected is None and not lora and parts is None:
        log(f"note: diffusers cannot build {config.get('_class_name')!r} from {config_file}; names and shapes are "
            "written unchecked")
    elif expected is not None:
        check_against_config(tensors, expected, str(rc.role_dir) + (" (EMA)" if ema else ""), config_file)
        order = {k: i for i, k in enumerate(expected)}
        tensors = sorted(tensors, key=lambda t: order[t.name])

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    what = f"{rc.checkpoint.name}/{rc.role}{' EMA' if ema else ''} (step {rc.step}, {rc.world_size} rank" \
           f"{'s' if rc.world_size > 1 else ''})"
    kind = " as a LoRA file" if lora else " merged into its base" if merge else ""
    log(f"converting {what}{kind} -> {out}")
    old = None
    source = f"{rc.role_dir}{' EMA' if ema else ''}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        if lora:
            tmp.mkdir(parents=True)
            shards, nbytes = write_lora(adapters, tmp, getattr(torch, DTYPES[dtype]), source)
            components = []
        elif parts is not None:
            tmp.mkdir(parents=True)
            shards = nbytes = 0
            for folder, group in parts.items():
                if not group:  # kept frozen by the run: the base's, as it is
                    shutil.copytree(part_configs[folder].parent, tmp / folder)
                    continue
                (tmp / folder).mkdir()
                shutil.copyfile(part_configs[folder], tmp / folder / "config.json")
                n, b = write_transformer(role_w, group, tmp / folder, getattr(torch, DTYPES[dtype]),
                                         max_bytes, log, source=source)
                shards, nbytes = shards + n, nbytes + b
            components = copy_base(Path(base), tmp, link_base, family.transformer_folders) if base is not None else []
        else:
            (tmp / "transformer").mkdir(parents=True)
            shutil.copyfile(config_file, tmp / "transformer" / "config.json")
            shards, nbytes = write_transformer(role_w, tensors, tmp / "transformer", getattr(torch, DTYPES[dtype]),
                                               max_bytes, log, source=source)
            components = copy_base(Path(base), tmp, link_base, family.transformer_folders) if base is not None else []
        ckpt.fsync_tree(tmp)  # on disk before it takes OUT's name
        if out.exists() or out.is_symlink():
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:  # an error or Ctrl-C between the renames: the old export goes back
                os.rename(old, out)
                raise
        else:
            os.rename(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{out}: cannot write the export ({exc.strerror or exc})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:  # the new export is in place: only now does the old one go
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
        if old.exists() or old.is_symlink():
            log(f"note: the previous export, moved to {old}, could not be removed; remove it yourself")
    result = ExportResult(out, rc.checkpoint, rc.role, ema, len(tensors),
                          sum(t.numel for t in tensors), shards, nbytes, components)
    if lora:
        log(f"wrote {out}/{LORA_WEIGHTS_NAME}: {result.num_params:,} adapter values in {result.num_tensors} "
            f"tensors (rank {lora_cfg['r']}, alpha {lora_cfg.get('lora_alpha')}), {dtype}, {_human(nbytes)}; load it "
            f"with WanPipeline.load_lora_weights or ds-distill sample --lora")
        return result
    written = "transformer" if parts is None else " and ".join(
        f"{folder} ({'trained' if group else 'frozen, from the base'})" for folder, group in parts.items())
    log(f"wrote {out}/{written}: {result.num_params:,} values in {result.num_tensors} tensors, {dtype}, "
        f"{shards} file{'s' if shards > 1 else ''}, {_human(nbytes)}"
        + (f"; pipeline components from {base}: {', '.join(components)}" if components else ""))
    return result


def build_parser() -> argparse.ArgumentParser:
    from ds_distill.cli import ArgumentParser

    p = ArgumentParser(
        prog="ds-distill convert",
        description="Convert a ds_distill ZeRO-3 checkpoint into a Diffusers safetensors directory (streamed). "
                    "DeepSpeed checkpoint files are pickles: convert only checkpoints you trust.",
    )
    p.add_argument("checkpoint", help="checkpoint-<step> folder, a role folder in it, or an output_dir (its latest)")
    p.add_argument("out", help="output directory (written whole or not at all)")
    p.add_argument("--role", default=None, help="trainable role to export (default: student)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the written weights")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights instead of the trained ones")
    p.add_argument("--base", default=None, metavar="MODEL_DIR",
                   help="pipeline directory: its transformer config, and its other components copied into OUT")
    p.add_argument("--link-base", action="store_true",
                   help="symlink --base's components instead of copying them (OUT then depends on MODEL_DIR)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--lora", action="store_true",
                      help=f"a LoRA role: write its adapters as a Diffusers LoRA file (OUT/{LORA_WEIGHTS_NAME})")
    kind.add_argument("--merge", action="store_true",
                      help="a LoRA role: write full weights with the adapters folded into the base")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it is an earlier export (swapped in only once the new one is complete)")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.link_base and args.base is None:
        raise UserError("--link-base needs --base")
    try:
        convert(args.checkpoint, args.out, role=args.role, dtype=args.dtype, max_shard_size=args.max_shard_size,
                ema=args.ema, base=args.base, link_base=args.link_base, overwrite=args.overwrite, lora=args.lora,
                merge=args.merge)
    except KeyboardInterrupt:
        print(f"interrupted: {args.out} is as it was (nothing half-written is left)", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""An EMA of a ZeRO-3 module kept partitioned: each rank averages only its own slice of every parameter."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch


class PartitionedEMA:
    """fp32 shadow of this rank's fp32 master partition of every trained parameter (partitioned and persistent
    alike; of a LoRA role, its adapters: the frozen base needs no average); `swapped_in()` puts it into the module
    for sampling. ZeRO-3 access goes through the strategy."""

    def __init__(self, module: torch.nn.Module, decay: float, strategy):
        self.module = module
        self.decay = decay
        self.strategy = strategy
        masters = strategy.master_partitions(module, trainable_only=True)
        self.names = list(masters)
        self.shadow = {n: t.detach().float().clone() for n, t in masters.items()}

    @torch.no_grad()
    def update(self, step: int, start_step: int) -> None:
        """Copy before `start_step`, then shadow = decay * shadow + (1 - decay) * master weights (fp32)."""
        for n, master in self.strategy.master_partitions(self.module, trainable_only=True).items():
            if step < start_step:
                self.shadow[n].copy_(master)
            else:
                self.shadow[n].lerp_(master.float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """Collective: the module computes with the EMA weights inside the block; its own weights come back after."""
        with self.strategy.partitions_swapped_in(self.module, self.shadow):
            yield

    def file_for(self, role_dir: Path) -> Path:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        return Path(role_dir) / "ema" / f"rank-{rank:05d}-of-{world:05d}.safetensors"

    def save(self, role_dir: Path) -> None:
        """Each rank writes its partitions (with full shapes in the metadata, for export)."""
        from safetensors.torch import save_file
        import json

        path = self.file_for(role_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        shapes = self.strategy.partition_shapes(self.module, trainable_only=True)
        save_file({n: t.contiguous() for n, t in self.shadow.items()}, str(path),
                  metadata={"shapes": json.dumps(shapes), "decay": str(self.decay)})

    def load(self, role_dir: Path) -> None:
        """This rank's partitions; from a checkpoint of another rank count, re-sliced from the whole tensors."""
        from safetensors.torch import load_file

        from ds_distill.errors import CheckpointError

        path = self.file_for(role_dir)
        if path.is_file():
            loaded = load_file(str(path))
            for n in self.names:
                self.shadow[n].copy_(loaded[n])
            return
        files = sorted((Path(role_dir) / "ema").glob("rank-*-of-*.safetensors"))
        if not files:
            raise CheckpointError(f"{Path(role_dir)}: no EMA partitions (ema/rank-*.safetensors); set "
                                  "method_config.ema_decay: 0 or resume a checkpoint written with EMA on")
        full = whole_tensors(files)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        for n in self.names:
            local = self.shadow[n]
            flat = full[n].flatten()
            lo = rank * local.numel()
            part = torch.zeros_like(local)
            take = flat[lo : lo + local.numel()]
            part[: take.numel()] = take
            local.copy_(part)


def whole_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Reassemble whole EMA tensors from every rank's flat partition files (rank order), trimmed and reshaped."""
    import json

    from safetensors import safe_open

    handles = [safe_open(str(f), "pt") for f in sorted(files)]
    shapes = json.loads(handles[0].metadata()["shapes"])
    out = {}
    for name, shape in shapes.items():
        flat = torch.cat([h.get_tensor(name).flatten() for h in handles])
        n = 1
        for d in shape:
            n *= d
        out[name] = flat[:n].reshape(shape).float()
    return out

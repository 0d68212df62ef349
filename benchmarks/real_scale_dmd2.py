"""DMD2 at the users' scale with random weights: Wan2.1-1.3B student and critic, a 14B-shaped teacher.

Roles are built from configs (full layer counts: 1.3B = dim 1536, 12 heads, 30 layers, ffn 8960; 14B = dim 5120,
40 heads, 40 layers, ffn 13824; text_dim 4096) under zero.Init through ds_distill's own `build_runtime` (only the
weight streaming is left out: the family below is `wan` with random weights), bf16, ZeRO-3 with persistence
threshold 0, gradient checkpointing on, 81x480x832 (latent 16x21x60x104, 32,760 tokens), text_len 512, and
3 DMD2 iterations (student and critic both update every iteration). Prints per rank: each role's model-state
memory after it was built and its peak activation memory over its forward calls, and per iteration the
seconds and the peak device memory. Run on one rank (`python`) or several (`torchrun --nproc_per_node N`; NCCL).

`--tiny` runs the same code at tiny size on the CPU (tools/gpu_check.sh --cpu-smoke, part of the test suite).

    python benchmarks/real_scale_dmd2.py [--iterations 3] [--tiny] [--frames 81 --height 480 --width 832]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

COMMON = dict(patch_size=[1, 2, 2], in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
              cross_attn_norm=True, eps=1e-6, rope_max_seq_len=1024, qk_norm="rms_norm_across_heads")
WAN_1_3B = dict(COMMON, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)
WAN_14B = dict(COMMON, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40)
TINY = dict(COMMON, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2, text_dim=32,
            freq_dim=32, in_channels=4, out_channels=4)
GIB = 2**30


def register_random_family():
    """`wan_random`: the wan family, with the weight streaming left out (random weights from the config)."""
    from ds_distill.dispatch import _FAMILIES, register_family
    from ds_distill.models.wan import WanFamily
    from ds_distill.models.wan_common import add_lora, keep_diffusers_fp32

    if "wan_random" in _FAMILIES:
        return

    @register_family("wan_random")
    class RandomWan(WanFamily):
        def load_transformer(self, comps, strategy, ds_config, use_zero_init=True, trainable=True, lora=None,
                             experts=None):  # one transformer: preflight refuses roles.<name>.experts
            from diffusers import WanTransformer3DModel

            config = {k: v for k, v in comps.transformer_config.items() if not k.startswith("_")}
            with strategy.zero_init(ds_config):
                module = WanTransformer3DModel.from_config(config)
            offload = ds_config.get("zero_optimization", {}).get("offload_param", {}).get("device")
            keep_diffusers_fp32(module, fp32_storage=not trainable and offload != "nvme")
            if lora is not None:
                add_lora(module, lora)
            return module


def write_inputs(root: Path, tiny: bool, text_len: int, rank: int) -> None:
    """Config-only role folders, threshold-0 templates and a text-only dataset (rank 0 writes, others wait)."""
    if rank == 0:
        import pyarrow as pa
        import pyarrow.parquet as pq
        import torch

        from ds_distill.utils.dataset_schema import TEXT_ONLY_SCHEMA, tensor_to_bytes

        channels = 4 if tiny else 16
        for name, cfg in (("small", TINY if tiny else WAN_1_3B), ("big", TINY if tiny else WAN_14B)):
            (root / name / "transformer").mkdir(parents=True, exist_ok=True)
            (root / name / "vae").mkdir(parents=True, exist_ok=True)
            (root / name / "transformer" / "config.json").write_text(
                json.dumps({"_class_name": "WanTransformer3DModel", **cfg}))
            (root / name / "vae" / "config.json").write_text(json.dumps(
                {"z_dim": channels, "latents_mean": [0.0] * channels, "latents_std": [1.0] * channels}))
        for tname in ("zero3_train.json", "zero3_inference.json"):
            template = json.loads((REPO / "ds_configs" / tname).read_text())
            template["zero_optimization"]["stage3_param_persistence_threshold"] = 0
            (root / tname).write_text(json.dumps(template))
        dim = TINY["text_dim"] if tiny else 4096
        g = torch.Generator().manual_seed(0)
        rows = [{"id": str(i), "text_embedding_bytes": tensor_to_bytes(torch.randn(text_len, dim, generator=g)),
                 "text_embedding_shape": [text_len, dim], "text_embedding_dtype": "float32", "caption": str(i)}
                for i in range(16)]
        (root / "data").mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=TEXT_ONLY_SCHEMA), root / "data" / "part-0.parquet")
        (root / "ready").write_text("1")
    while not (root / "ready").exists():
        time.sleep(0.1)


def recipe(root: Path, args) -> dict:
    return {
        "recipe": {"family": "wan_random", "method": "dmd2"},
        "roles": {"student": {"path": str(root / "small"), "trainable": True},
                  "teacher": {"path": str(root / "big"), "trainable": False},
                  "critic": {"path": str(root / "small"), "trainable": True}},
        "training": {"output_dir": str(root / "out"), "data_path": str(root / "data"),
                     "max_train_steps": args.iterations, "train_batch_size": 1, "dataloader_num_workers": 0,
                     "mixed_precision": "fp32" if args.tiny else "bf16", "learning_rate": 2e-6,
                     "max_grad_norm": 1.0, "text_len": args.text_len, "num_frames": args.frames,
                     "height": args.height, "width": args.width, "gradient_checkpointing": True,
                     "uncond_embedding": "zeros", "trackers": ["none"], "sp_size": args.sp_size,
                     "ds_config": str(root / "zero3_train.json"),
                     "ds_config_inference": str(root / "zero3_inference.json")},
        "pipeline_config": {"flow_shift": 3.0},
        "method_config": {"rollout_mode": "simulate", "dmd_denoising_steps": [1000, 750, 500, 250],
                          "generator_update_interval": 1, "real_score_guidance_scale": 3.0},
    }


class Memory:
    """Device memory figures: CUDA's allocator on a GPU, the process RSS (VmRSS / VmHWM) on the CPU."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch

    def now(self) -> int:
        if self.cuda:
            return self.torch.cuda.memory_allocated()
        return _status("VmRSS")

    def peak(self) -> int:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated()
        return _status("VmHWM")

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        else:  # VmHWM back to the current RSS (where the kernel allows it)
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny roles, 5x32x32, fp32, on the CPU (the CI smoke)")
    p.add_argument("--frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--text-len", type=int)
    p.add_argument("--sp-size", type=int, default=1,
                   help="training.sp_size: ranks per sample (DeepSpeed-Ulysses); must divide the rank count, the "
                        "heads (12 student/critic, 40 teacher) and the tokens")
    p.add_argument("--workdir", help="where the config folders go (default: a temporary folder)")
    args = p.parse_args()
    size = (5, 32, 32, 8) if args.tiny else (81, 480, 832, 512)
    for key, value in zip(("frames", "height", "width", "text_len"), size):
        if getattr(args, key) is None:
            setattr(args, key, value)

    import torch

    from ds_distill.dispatch import build_runtime, check_recipe
    from ds_distill.engines import Strategy, init_distributed
    from ds_distill.utils.config import recipe_from_mapping
    from ds_distill.utils.dataloader import ParquetDataset, TrainLoader

    register_random_family()
    dist = init_distributed()
    rank = dist.rank
    shared = Path(args.workdir or os.environ.get("REAL_SCALE_WORKDIR") or tempfile.gettempdir()) / "real_scale_dmd2"
    if rank == 0 and (shared / "ready").exists():
        (shared / "ready").unlink()
    torch.distributed.barrier()
    write_inputs(shared, args.tiny, args.text_len, rank)
    checked = check_recipe(recipe_from_mapping(recipe(shared, args), "<real_scale_dmd2>"))
    t = checked.recipe.training
    mem = Memory(dist.device)
    where = f"rank {rank}/{dist.world_size} on {dist.device}" + (
        f" ({torch.cuda.get_device_name(dist.device)})" if dist.device.type == "cuda" else "")

    def say(text: str) -> None:
        print(f"[{where}] {text}", flush=True)

    states: dict[str, int] = {}
    built_before = mem.now()
    start = time.perf_counter()
    rt = build_runtime(checked, Strategy(dist))
    build_s = time.perf_counter() - start
    total_states = mem.now() - built_before
    params = {name: sum(getattr(q, "ds_numel", q.numel()) for q in h.module.parameters())
              for name, h in rt.bundle.roles.items()}
    activation_peak = {name: 0 for name in params}

    def hooks(name, module):
        def pre(_m, _a):
            mem.reset_peak()
            pre.base = mem.now()

        def post(_m, _a, _o):
            activation_peak[name] = max(activation_peak[name], mem.peak() - pre.base)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    for name, h in rt.bundle.roles.items():
        hooks(name, h.module)
        # partition sizes: what this rank holds of the role (the rest lives on the other ranks)
        local = sum(q.ds_tensor.numel() if hasattr(q, "ds_tensor") else q.numel() for q in h.module.parameters())
        states[name] = local
    say(f"roles built in {build_s:.1f} s; model states on this rank {total_states / GIB:.2f} GiB in all "
        f"({'allocated' if mem.cuda else 'RSS growth'})")
    for name, n in params.items():
        kind = "trainable" if rt.bundle[name].trainable else "frozen"
        say(f"role {name}: {n / 1e6:.2f}M params ({kind}), {states[name] / 1e6:.2f}M in this rank's partition")
    loader = TrainLoader(ParquetDataset(t.data_path, t.text_len, False), 1, rt.sp.dp_rank, rt.sp.dp_size, t.seed)
    shape = rt.adapter.sample_latent_shape
    say(f"latent {list(shape)} = {shape[1] * (shape[2] // 2) * (shape[3] // 2)} tokens, "
        f"{t.mixed_precision}, persistence threshold 0, gradient checkpointing on")
    for i in range(args.iterations):
        batch = next(loader)
        mem.reset_peak()
        if mem.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        scalars = rt.method.train_one_step([batch], i + 1)
        if mem.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        losses = ", ".join(f"{k} {v:.4g}" for k, v in sorted(scalars.items()) if "loss" in k)
        say(f"iteration {i + 1}: {seconds:.2f} s, peak device memory {mem.peak() / GIB:.2f} GiB ({losses})")
        if not all(v == v for v in scalars.values()):
            say("FAIL: non-finite scalars")
            return 1
    for name in params:
        say(f"role {name}: peak memory over its forward calls +{activation_peak[name] / GIB:.2f} GiB above the "
            f"memory in use when the call began")
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())

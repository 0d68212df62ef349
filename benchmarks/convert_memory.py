"""Peak memory of the ZeRO-3 -> safetensors converter against the checkpoint it converts.

Builds a 61.5M-parameter Wan transformer (246 MB of fp32 weights), trains it for one step on 2 ranks with
`deepspeed --num_gpus 2 --module ds_distill.train` (a real ZeRO-3 checkpoint), then runs
`tools/convert_zero_to_safetensors.py` as a subprocess and records its peak RSS (VmHWM) as it exits.
Anchor: DeepSpeed's own `convert_zero_checkpoint_to_fp32_state_dict` on the same checkpoint and shard size.

The target is: peak working memory <= 1.5 x (largest output shard + one rank's fp32 partition), where working
memory is the converter's peak RSS minus the RSS of a process that only imports what it imports (python, torch,
deepspeed, diffusers) and builds the transformer on the meta device, as the converter does before it reads any weights.

    python benchmarks/convert_memory.py [--workdir DIR] [--max-shard-size 40MB] [--dtype bf16] [--mixed-precision bf16]
A --workdir is kept and reused (the model and checkpoint are built once); without it a temporary one is removed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PYTHON = sys.executable
CONFIG = dict(num_layers=6, num_attention_heads=12, attention_head_dim=64, ffn_dim=3072)


def env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", DS_DISTILL_NO_TQDM="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             PYTHONPATH=str(REPO) + os.pathsep + e.get("PYTHONPATH", ""))
    e.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs a script (or `-c CODE`) and records the process's own peak RSS (VmHWM) as it exits. The kernel's
# wait4/getrusage maxrss would not do: a forked child inherits the parent's high-water mark at exec.
_MEASURE = """
import os, runpy, sys
try:
    if sys.argv[1] == "-c":
        code, sys.argv = sys.argv[2], ["-c"] + sys.argv[3:]
        exec(compile(code, "<measured>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with open("/proc/self/status") as f:
        hwm = next(line.split()[1] for line in f if line.startswith("VmHWM"))
    with open(os.environ["BENCH_HWM_FILE"], "w") as f:
        f.write(hwm)
"""


def run_measured(cmd: list[str], measure: bool = True) -> tuple[float, float, str]:
    """Run `python SCRIPT ARGS` / `python -c CODE` (or any cmd with measure=False); returns (peak RSS bytes, s, log)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        hwm_file = Path(tmp) / "hwm"
        full = [PYTHON, "-c", _MEASURE, *cmd[1:]] if measure else cmd
        res = subprocess.run(full, cwd=REPO, env=dict(env(), BENCH_HWM_FILE=str(hwm_file)), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if res.returncode != 0:
            raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stdout[-3000:]}")
        peak = int(hwm_file.read_text()) * 1024.0 if measure else float("nan")  # VmHWM is in kB
    return peak, time.perf_counter() - started, res.stdout


def build_checkpoint(work: Path, precision: str) -> Path:
    """Model + toy data + one 2-rank training step; returns the checkpoint folder (reused when present)."""
    import yaml

    from ds_distill.utils import checkpoint as ckpt

    out = work / f"run_{precision}"
    found = ckpt.find_resume_checkpoint(out, "latest") if out.is_dir() else None
    if found is not None:
        print(f"reusing {found}")
        return found
    model, data = work / "wan61m", work / "toy"
    t0 = time.perf_counter()
    if not (model / "model_index.json").is_file():
        from ds_distill.models.tiny import TinyWanConfig, make_tiny_wan

        make_tiny_wan(model, TinyWanConfig(**CONFIG))
    if not (data / "latents").is_dir():
        from ds_distill.utils.toy_data import ToyDataConfig, make_toy_data

        make_toy_data(data, model, ToyDataConfig(rows_per_caption=2, num_files=1, num_frames=5, height=64, width=64))
    print(f"model and data ready ({time.perf_counter() - t0:.0f} s)")
    recipe = {
        "recipe": {"family": "wan", "method": "finetune"},
        "roles": {"student": {"path": str(model), "trainable": True}},
        "training": {"output_dir": str(out), "data_path": str(data / "latents"), "max_train_steps": 1,
                     "train_batch_size": 1, "dataloader_num_workers": 0, "mixed_precision": precision,
                     "learning_rate": 1e-4, "text_len": 16, "num_frames": 5, "height": 64, "width": 64,
                     "gradient_checkpointing": False, "checkpointing_steps": 1, "trackers": []},
        "pipeline_config": {"flow_shift": 3.0},
        "method_config": {"weighting_scheme": "uniform"},
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    t0 = time.perf_counter()
    run_measured([str(Path(PYTHON).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                  "--module", "ds_distill.train", "--config", str(path)], measure=False)
    print(f"2-rank training step + checkpoint ({time.perf_counter() - t0:.0f} s)")
    return ckpt.find_resume_checkpoint(out, "latest")


def partition_bytes(role_dir: Path) -> int:
    """One rank's fp32 partition (the largest), read from the optimizer file's flat groups."""
    import torch

    best = 0
    for f in sorted(role_dir.glob("*zero_pp_rank_*_optim_states.pt")):  # bf16 runs: bf16_zero_pp_rank_*
        sd = torch.load(f, map_location="cpu", mmap=True, weights_only=False)
        groups = sd["optimizer_state_dict"]["fp32_flat_groups"]
        best = max(best, sum(g.numel() * g.element_size() for g in groups))
    return best


def mb(x: float) -> str:
    return f"{x / 1e6:8.1f} MB"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None)
    p.add_argument("--max-shard-size", default="40MB")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--mixed-precision", default="bf16", choices=["fp32", "bf16"],
                   help="precision of the training run whose checkpoint is converted (default bf16)")
    args = p.parse_args()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="convert_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        checkpoint = build_checkpoint(work, args.mixed_precision)
        role_dir = checkpoint / "student"
        ckpt_bytes = sum(f.stat().st_size for f in role_dir.rglob("*") if f.is_file())
        part = partition_bytes(role_dir)
        config = work / "wan61m" / "transformer" / "config.json"

        base_rss, _, _ = run_measured([PYTHON, "-c", (
            "import json, torch, deepspeed, safetensors.torch, ds_distill.export as e; "
            f"assert e.expected_state(json.load(open({str(config)!r}))) is not None")])

        ours = {}
        for dtype in dict.fromkeys([args.dtype, "fp32"]):
            out = work / f"export_{dtype}"
            shutil.rmtree(out, ignore_errors=True)
            peak, secs, _ = run_measured([PYTHON, str(REPO / "tools" / "convert_zero_to_safetensors.py"),
                                          str(checkpoint), str(out), "--dtype", dtype,
                                          "--max-shard-size", args.max_shard_size])
            sizes = [f.stat().st_size for f in (out / "transformer").glob("*.safetensors")]
            ours[dtype] = (peak, secs, len(sizes), sum(sizes), max(sizes))

        # Ablation: mmap alone, without giving pages back (the converter with its page dropping switched off).
        out = work / "export_mmap_only"
        shutil.rmtree(out, ignore_errors=True)
        nodrop_peak, _, _ = run_measured([PYTHON, "-c", (
            "import sys, ds_distill.export as e; e._PageDropper.drop = lambda self, t: None; "
            f"sys.exit(e.main([{str(checkpoint)!r}, {str(out)!r}, '--dtype', {args.dtype!r}, "
            f"'--max-shard-size', {args.max_shard_size!r}]))")])

        ds_out = work / "export_deepspeed"
        shutil.rmtree(ds_out, ignore_errors=True)
        ds_peak, ds_secs, _ = run_measured([PYTHON, "-c", (
            "from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict as c; "
            f"c({str(checkpoint)!r}, {str(ds_out)!r}, tag='student', safe_serialization=True, "
            f"max_shard_size={args.max_shard_size!r})")])
        ds_sizes = [f.stat().st_size for f in ds_out.glob("*.safetensors")]
        ds_base, _, _ = run_measured([PYTHON, "-c", (
            "import torch, deepspeed, safetensors.torch, huggingface_hub; "
            "from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict")])
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"checkpoint {checkpoint} (student, 2 ranks, {args.mixed_precision} run)")
    print(f"  role folder on disk (fp32 weights + Adam moments, all ranks)  {mb(ckpt_bytes)}")
    print(f"  one rank's fp32 partition                                     {mb(part)}")
    print(f"  fixed cost: python + torch + deepspeed + diffusers (no data)  {mb(base_rss)}")
    met = True
    for dtype, (peak, secs, n, total, largest) in ours.items():
        target = 1.5 * (largest + part)
        work_mem = peak - base_rss
        met &= work_mem <= target
        print(f"converter --dtype {dtype} --max-shard-size {args.max_shard_size}: {n} shards, {mb(total).strip()}, "
              f"largest {mb(largest).strip()}, {secs:.1f} s")
        print(f"  peak RSS {mb(peak).strip()}; working memory (peak - fixed cost) {mb(work_mem).strip()} "
              f"= {work_mem / ckpt_bytes:.2f} x checkpoint on disk")
        print(f"  target working memory <= 1.5 x (largest shard + one partition) = {mb(target).strip()}: "
              f"{'MET' if work_mem <= target else 'NOT MET'} ({work_mem / target:.2f} x target)")
    print(f"ablation: --dtype {args.dtype} with mmap alone (mapped pages kept, not given back): peak RSS "
          f"{mb(nodrop_peak).strip()}; working memory {mb(nodrop_peak - base_rss).strip()} "
          f"({(nodrop_peak - base_rss) / (1.5 * (ours[args.dtype][4] + part)):.2f} x target)")
    fp32_work = ours["fp32"][0] - base_rss
    print(f"anchor: DeepSpeed convert_zero_checkpoint_to_fp32_state_dict, fp32, same shard size: {len(ds_sizes)} "
          f"shards, largest {mb(max(ds_sizes)).strip()}, {ds_secs:.1f} s")
    print(f"  peak RSS {mb(ds_peak).strip()}; its fixed cost (python + torch + deepspeed) {mb(ds_base).strip()}; "
          f"working memory {mb(ds_peak - ds_base).strip()}")
    print(f"  ours (fp32) / DeepSpeed's working memory = {fp32_work / max(ds_peak - ds_base, 1):.2f}")
    print(f"benchmark wall time {time.perf_counter() - started:.0f} s")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())

"""What the preflight (every check before anything is written) adds to a tiny run's start-up.

Runs `python -m ds_distill.train` on the tiny Wan and toy data (finetune, 1 step; DMD2 with three roles, 1 step)
and reads the run's own log line `start-up: preflight P s of S s before the first step`, where S counts from
`main()` to the first step. It also times, from outside, the whole start-up: from launching the process to that
line (interpreter and imports included). Target: preflight <= 10% of the start-up. Median of --repeats runs.
Importing diffusers and DeepSpeed, which the run needs right after the checks, happens before the checks are
timed: preflight moves that cost earlier, it does not add it.

    python benchmarks/preflight_cost.py [--repeats 3] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PYTHON = sys.executable
LINE = re.compile(r"start-up: preflight ([\d.]+) s of ([\d.]+) s before the first step")


def recipe(model: Path, data: Path, out: Path, method: str) -> dict:
    training = {"output_dir": str(out), "data_path": str(data / ("latents" if method == "finetune" else "text_only")),
                "max_train_steps": 1, "train_batch_size": 2, "dataloader_num_workers": 0,
                "mixed_precision": "fp32", "text_len": 16, "num_frames": 5, "height": 32, "width": 32,
                "gradient_checkpointing": False, "checkpointing_steps": 0, "trackers": ["none"]}
    roles = {"student": {"path": str(model), "trainable": True}}
    method_config: dict = {}
    if method == "dmd2":
        roles.update(teacher={"path": str(model), "trainable": False}, critic={"path": str(model), "trainable": True})
        method_config = {"rollout_mode": "simulate", "dmd_denoising_steps": [1000, 500]}
    return {"recipe": {"family": "wan", "method": method}, "roles": roles, "training": training,
            "method_config": method_config}


def one_run(path: Path) -> tuple[float, float, float]:
    """(preflight s, start-up inside main s, start-up from process launch s)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_DISTILL_NO_TQDM="1", HF_HUB_OFFLINE="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))  # the noise op's build cache
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    started = time.perf_counter()
    proc = subprocess.Popen([PYTHON, "-m", "ds_distill.train", "--config", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    found = None
    for line in proc.stderr:
        m = LINE.search(line)
        if m and found is None:
            found = (float(m.group(1)), float(m.group(2)), time.perf_counter() - started)
    proc.wait()
    if proc.returncode != 0 or found is None:
        raise SystemExit(f"run failed (exit {proc.returncode}) or printed no start-up line")
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="preflight-cost-"))
    from ds_distill.models.tiny import make_tiny_wan
    from ds_distill.utils.toy_data import ToyDataConfig, make_toy_data

    model = work / "tiny_wan"
    if not model.is_dir():
        make_tiny_wan(model)
    data = work / "toy"
    if not data.is_dir():
        make_toy_data(data, model, ToyDataConfig(rows_per_caption=16))
    for method in ("finetune", "dmd2"):
        samples = []
        for i in range(args.repeats):
            out = work / f"out-{method}-{i}-{time.time_ns()}"
            path = work / f"{method}.yaml"
            path.write_text(yaml.safe_dump(recipe(model, data, out, method), sort_keys=False))
            samples.append(one_run(path))
        pre, inside, total = (statistics.median(s[k] for s in samples) for k in range(3))
        print(f"{method:8s} preflight {pre:.3f} s | start-up in main {inside:.2f} s ({100 * pre / inside:.1f}%) | "
              f"from process launch {total:.2f} s ({100 * pre / total:.1f}%; target <= 10%)", flush=True)


if __name__ == "__main__":
    main()

"""Soak: N iterations of the tiny DMD2 recipe on 2 ranks with a checkpoint every 10 (rotation on), sampling
each rank's resident memory; prints RSS per rank over the run and the growth after warm-up (target < 5%).

    python benchmarks/soak_memory.py [--iterations 300] [--warmup 30] [--nproc 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def rank_processes(launcher: psutil.Process) -> list[psutil.Process]:
    out = []
    for p in launcher.children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "ds_distill.train" in cmd and "--local_rank" in cmd:
            try:
                parent = " ".join(p.parent().cmdline())
            except (psutil.Error, AttributeError):
                parent = ""
            if "--local_rank" not in parent:  # a rank, not one of its DataLoader workers
                out.append(p)
    return sorted(out, key=lambda p: p.pid)


def steps_done(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1])["step"] if lines else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args()
    import yaml

    from ds_distill.models.tiny import make_tiny_wan
    from ds_distill.utils.toy_data import ToyDataConfig, make_toy_data

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_tiny_wan(tmp / "tiny_wan")
        data = make_toy_data(tmp / "toy", model, ToyDataConfig(rows_per_caption=16))
        recipe = yaml.safe_load((REPO / "recipes" / "tiny_dmd2.yaml").read_text())
        for role in recipe["roles"].values():
            role["path"] = str(model)
        recipe["training"].update(
            output_dir=str(tmp / "run"), data_path=str(data / "text_only"), max_train_steps=args.iterations,
            train_batch_size=args.batch, checkpointing_steps=10, checkpoints_total_limit=2, log_validation=True,
            validation_steps=50, validation_dataset_file=str(data / "validation.json"), dataloader_num_workers=1)
        path = tmp / "soak.yaml"
        path.write_text(yaml.safe_dump(recipe))
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_DISTILL_NO_TQDM="1", HF_HUB_OFFLINE="1")
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(args.nproc), "--module",
               "ds_distill.train", "--config", str(path)]
        log = open(tmp / "soak.log", "w")
        launcher = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        launcher_ps = psutil.Process(launcher.pid)
        samples: dict[int, list[float]] = {}  # step -> RSS (MB) per rank
        started = time.time()
        while launcher.poll() is None:
            ranks = rank_processes(launcher_ps)
            step = steps_done(tmp / "run")
            if ranks and step:
                try:
                    samples[step] = [r.memory_info().rss / 2**20 for r in ranks]
                except psutil.Error:
                    pass
            time.sleep(0.5)
        log.close()
        if launcher.returncode != 0:
            print((tmp / "soak.log").read_text()[-4000:])
            print(f"soak run failed (exit {launcher.returncode})")
            return 1
        checkpoints = sorted(p.name for p in (tmp / "run").glob("checkpoint-*"))
    elapsed = time.time() - started
    steps = sorted(samples)
    print(f"tiny DMD2, {args.nproc} ranks, {args.iterations} iterations, checkpoint every 10 (keep 2), "
          f"validation every 50: {elapsed:.0f} s; checkpoints left: {checkpoints}")
    print(f"{'step':>6}  " + "  ".join(f"rank{r} RSS MB" for r in range(args.nproc)))
    shown = [s for s in steps if s >= args.warmup]
    for s in shown[:: max(1, len(shown) // 10)] + [shown[-1]]:
        print(f"{s:>6}  " + "  ".join(f"{v:12.1f}" for v in samples[s]))
    base = [samples[min(shown)][r] for r in range(args.nproc)]
    last_window = [s for s in shown if s >= shown[-1] - 20]
    end = [max(samples[s][r] for s in last_window) for r in range(args.nproc)]
    growth = max((e - b) / b for b, e in zip(base, end))
    print(f"growth after warm-up (step {min(shown)} -> last 20 steps, worst rank): {growth * 100:+.2f}% "
          f"(target < 5%): {'MET' if growth < 0.05 else 'NOT MET'}")
    return 0 if growth < 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())

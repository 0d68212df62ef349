"""Soak: N iterations of the tiny DMD2 recipe on 2 ranks with a checkpoint every 10 (rotation on), sampling
each rank's resident memory; prints RSS per rank over the run and the growth after warm-up (target < 5%).

    python benchmarks/soak_memory.py [--iterations 300] [--warmup 30] [--nproc 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
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
    p.add_argument("--dump", default=None, help="also write every sample (seconds, steps done, RSS MB per rank) "
                                                  "to this JSON file")
    args = p.parse_args()
    if args.warmup + 20 > 50 or args.iterations < 150:
        p.error("needs --warmup <= 30 and --iterations >= 150: the report compares the steps after warm-up with "
                "the last 20, and the first full 50-step cycle of (validation + 5 checkpoints) with a later one")
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
        samples: list[tuple[float, int, list[float]]] = []  # (seconds, steps done, RSS MB per rank), every 0.25 s
        started = time.time()
        while launcher.poll() is None:
            ranks = rank_processes(launcher_ps)
            step = steps_done(tmp / "run")
            if len(ranks) == args.nproc and step:
                try:
                    samples.append((time.time() - started, step, [r.memory_info().rss / 2**20 for r in ranks]))
                except psutil.Error:
                    pass
            time.sleep(0.25)
        log.close()
        if launcher.returncode != 0:
            print((tmp / "soak.log").read_text()[-4000:])
            print(f"soak run failed (exit {launcher.returncode})")
            return 1
        checkpoints = sorted(p.name for p in (tmp / "run").glob("checkpoint-*"))
    elapsed = time.time() - started
    if args.dump:
        Path(args.dump).write_text(json.dumps(samples))
    n, every = args.iterations, 50
    print(f"tiny DMD2, {args.nproc} ranks, {n} iterations, checkpoint every 10 (keep 2), validation every {every}: "
          f"{elapsed:.0f} s, {len(samples)} samples; checkpoints left: {checkpoints}")

    def window(lo: int, hi: int, how) -> list[float]:
        """Per rank, `how` (max or median) of the samples taken while the finished step count was in [lo, hi)."""
        rows = [rss for _, step, rss in samples if lo <= step < hi]
        if not rows:
            raise SystemExit(f"no samples between steps {lo} and {hi}: the run was too fast to sample")
        return [how([r[k] for r in rows]) for k in range(args.nproc)]

    print(f"{'steps':>9}  " + "  ".join(f"rank{r} median/max MB" for r in range(args.nproc)))
    cycles = [(lo, min(lo + every, n)) for lo in range(every, n, every)]  # each holds 1 validation + 5 saves
    for lo, hi in [(args.warmup, every)] + cycles:
        med, top = window(lo, hi, statistics.median), window(lo, hi, max)
        print(f"{lo:>4}-{hi - 1:<4}  " + "  ".join(f"{m:9.1f} /{t:7.1f}" for m, t in zip(med, top)))
    end = window(n, n + 1, max)
    print(f"{'end':>9}  " + "  ".join(f"{'':9s} /{t:7.1f}" for t in end)
          + f"   (after step {n}: its validation and save, then teardown, where RSS rises just before exit)")

    def growth(a: list[float], b: list[float]) -> float:
        return max((y - x) / x for x, y in zip(a, b))

    # Floor: what a rank holds between events, right after warm-up vs the last 20 steps before the end.
    floor = growth(window(args.warmup, args.warmup + 20, statistics.median),
                   window(n - 20, n, statistics.median))
    # Peaks: the highest RSS in the first and the last full cycle of (validation + 5 checkpoints).
    peak = growth(window(*cycles[0], max), window(*cycles[-1], max))
    ok = floor < 0.05 and peak < 0.05
    print(f"growth of the floor (median, steps {args.warmup}-{args.warmup + 19} -> {n - 20}-{n - 1}, worst rank): "
          f"{floor * 100:+.2f}% (target < 5%)")
    print(f"growth of the peak  (max, cycle {cycles[0][0]}-{cycles[0][1] - 1} -> {cycles[-1][0]}-{cycles[-1][1] - 1}, "
          f"worst rank): {peak * 100:+.2f}% (target < 5%)")
    print(f"resident memory flat after warm-up: {'MET' if ok else 'NOT MET'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

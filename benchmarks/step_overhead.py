"""What one finetune step costs three ways, on the same Wan-architecture model (>= 20M params), in one run:

  plain    plain PyTorch: the flow-matching step written out, torch.optim.AdamW(fused=True), clip, step
  bare     a bare DeepSpeed engine (deepspeed.initialize with the same ZeRO-3 config dict and optimizer),
           the same hand-written math
  ds       ds_distill: the `finetune` method through the trainer's engines (FinetuneMethod.train_one_step)

Both DeepSpeed ways use the stock templates with stage3_param_persistence_threshold 0 (every tensor partitioned,
as at the users' scale) and torch's own linear (see write_templates). Each way runs in its own process (so peak
RSS is its own); a round runs plain, bare and ds one after the other, and the rounds repeat (`--rounds`). The
ratios are taken inside each round (ratio of that round's medians, so a busy machine slows both sides of a ratio
alike) and the median over rounds is the figure; every round's ratio and the load average are printed too. Each
step is timed in wall seconds and in CPU seconds of its process (all threads): on a shared machine the wall
figure also counts the time spent waiting for a core, the CPU figure only the work.

    python benchmarks/step_overhead.py [--steps 8] [--threads 1] [--batch 2] [--rounds 3] [--no-plain]
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL = dict(patch_size=(1, 2, 2), num_attention_heads=8, attention_head_dim=64, in_channels=16, out_channels=16,
             text_dim=512, freq_dim=256, ffn_dim=2048, num_layers=5, rope_max_seq_len=64)
LATENT = (16, 3, 16, 16)  # [C, T, H, W] -> 3 x 8 x 8 = 192 tokens
TEXT = (32, 512)


def write_templates(workdir: Path) -> None:
    """The stock ZeRO-3 templates with stage3_param_persistence_threshold 0, for bare and ds alike. Both compute
    with torch's own linear: ds_distill builds under zero.Init(mem_efficient_linear=False), and the bare engine
    gets the same from `memory_efficient_linear: false` (else DeepSpeed swaps F.linear process-wide for its
    Python autograd Function, and the ratio would time that swap, not what ds_distill adds)."""
    for name in ("zero3_train.json", "zero3_inference.json"):
        template = json.loads((REPO / "ds_configs" / name).read_text())
        template["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        template["zero_optimization"]["memory_efficient_linear"] = False
        (workdir / name).write_text(json.dumps(template))


def make_inputs(workdir: Path) -> None:
    """A saved model directory and a parquet dataset that all three ways read, and the templates."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from diffusers import WanTransformer3DModel

    from ds_distill.utils.dataset_schema import T2V_SCHEMA, tensor_to_bytes

    write_templates(workdir)
    torch.manual_seed(0)
    model = WanTransformer3DModel(**MODEL)
    model.save_pretrained(workdir / "model" / "transformer")
    (workdir / "model" / "vae").mkdir(parents=True, exist_ok=True)
    (workdir / "model" / "vae" / "config.json").write_text(json.dumps(
        {"z_dim": 16, "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16}))
    rows = []
    g = torch.Generator().manual_seed(1)
    for i in range(64):
        lat, txt = torch.randn(LATENT, generator=g), torch.randn(TEXT, generator=g)
        rows.append({"id": str(i), "vae_latent_bytes": tensor_to_bytes(lat), "vae_latent_shape": list(LATENT),
                     "vae_latent_dtype": "float32", "text_embedding_bytes": tensor_to_bytes(txt),
                     "text_embedding_shape": list(TEXT), "text_embedding_dtype": "float32", "file_name": "",
                     "caption": "", "media_type": "video", "width": 128, "height": 128, "num_frames": 9,
                     "duration_sec": 0.5, "fps": 16.0})
    (workdir / "data").mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=T2V_SCHEMA), workdir / "data" / "part-0.parquet")


def recipe(workdir: Path, batch: int) -> dict:
    return {
        "recipe": {"family": "wan", "method": "finetune"},
        "roles": {"student": {"path": str(workdir / "model"), "trainable": True}},
        "training": {"output_dir": str(workdir / "out"), "data_path": str(workdir / "data"), "max_train_steps": 1000,
                     "train_batch_size": batch, "dataloader_num_workers": 0, "mixed_precision": "fp32",
                     "learning_rate": 1e-4, "max_grad_norm": 1.0, "text_len": TEXT[0], "gradient_checkpointing": False,
                     "uncond_embedding": "zeros", "trackers": ["none"],
                     "ds_config": str(workdir / "zero3_train.json")},
        "pipeline_config": {"flow_shift": 3.0},
        "method_config": {"weighting_scheme": "uniform"},
    }


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_way(way: str, workdir: Path, steps: int, batch: int) -> dict:
    """Time `steps` steps (after 2 warm-up steps) of one way in this process."""
    import torch

    from ds_distill.utils.config import recipe_from_mapping
    from ds_distill.dispatch import check_recipe

    checked = check_recipe(recipe_from_mapping(recipe(workdir, batch), "<bench>"))
    t = checked.recipe.training
    times, cpu_times = [], []  # wall seconds, and CPU seconds of this process (all its threads)

    if way == "ds":
        from ds_distill.dispatch import build_runtime
        from ds_distill.engines import Strategy, init_distributed
        from ds_distill.utils.dataloader import ParquetDataset, TrainLoader

        rt = build_runtime(checked, Strategy(init_distributed()))
        loader = TrainLoader(ParquetDataset(t.data_path, t.text_len, True), batch, 0, 1, t.seed)
        batches = [next(loader) for _ in range(steps + 2)]
        for i, b in enumerate(batches):
            start, cpu = time.perf_counter(), time.process_time()
            rt.method.train_one_step([b], i + 1)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu)
        params = sum(p.ds_numel for p in rt.bundle["student"].module.parameters())
        return {"way": way, "times": times[2:], "cpu_times": cpu_times[2:], "peak_rss_mb": peak_rss_mb(),
                "params": params}

    # plain and bare: the same flow-matching math written out by hand (no ds_distill code in the step).
    from diffusers import WanTransformer3DModel

    from ds_distill.utils.dataloader import ParquetDataset, TrainLoader

    loader = TrainLoader(ParquetDataset(t.data_path, t.text_len, True), batch, 0, 1, t.seed)
    batches = [next(loader) for _ in range(steps + 2)]
    model = WanTransformer3DModel.from_pretrained(workdir / "model" / "transformer").float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, betas=tuple(t.betas), eps=t.adam_eps,
                            weight_decay=t.weight_decay, fused=True)
    if way == "bare":
        import deepspeed

        from ds_distill.engines import init_distributed, load_template, train_ds_config

        init_distributed()
        ds_cfg = train_ds_config(load_template(t.ds_config, "<bench>", "ds_config"), micro_batch=batch,
                                 grad_accum=1, world_size=1, precision="fp32", max_grad_norm=t.max_grad_norm)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    gen = torch.Generator().manual_seed(0)
    for b in batches:
        start, cpu = time.perf_counter(), time.process_time()
        x0 = b["vae_latent"]
        eps = torch.randn(x0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=gen))
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * eps
        forward = engine if way == "bare" else model
        v = forward(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=b["text_embedding"],
                    return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(v.float(), eps - x0)
        if way == "bare":
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
    return {"way": way, "times": times[2:], "cpu_times": cpu_times[2:], "peak_rss_mb": peak_rss_mb(),
            "params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())}


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def three_ways(script: str, run_way, steps: int, batch: int, make=None):
    """Shared driver: parse the CLI; as a child run one way and print its RESULT line; as the parent run
    plain, bare and ds in separate processes, one round after another, and return (args, rounds): per round,
    each way's result with the median of its step times."""
    p = argparse.ArgumentParser(description=open(script).read().split('"""')[1].splitlines()[0])
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-plain", action="store_true", help="time bare and ds only (the ratio the target is on)")
    p.add_argument("--_way", help=argparse.SUPPRESS)
    p.add_argument("--_workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._way:
        import torch

        torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(run_way(args._way, Path(args._workdir), args.steps, args.batch)))
        sys.exit(0)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), DS_DISTILL_NO_TQDM="1")
    rounds: list[dict[str, dict]] = []
    print(f"load average at start: {load_average()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        (make or make_inputs)(Path(tmp))
        for _ in range(args.rounds):
            results: dict[str, dict] = {}
            for way in ("bare", "ds") if args.no_plain else ("plain", "bare", "ds"):
                out = subprocess.run([sys.executable, script, "--_way", way, "--_workdir", tmp, "--steps",
                                      str(args.steps), "--batch", str(args.batch), "--threads", str(args.threads)],
                                     env=env, capture_output=True, text=True)
                line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
                if out.returncode != 0 or not line:
                    print(out.stdout[-2000:], out.stderr[-4000:])
                    sys.exit(1)
                r = json.loads(line[0][7:])
                r["median"], r["cpu_median"] = median(r["times"]), median(r["cpu_times"])
                results[way] = r
            rounds.append(results)
            m = {w: r["median"] for w, r in results.items()}
            c = {w: r["cpu_median"] for w, r in results.items()}
            plain = f"plain {m['plain'] * 1e3:.0f} ms, " if "plain" in m else ""
            print(f"  round {len(rounds)}: wall {plain}bare {m['bare'] * 1e3:.0f} ms, "
                  f"ds {m['ds'] * 1e3:.0f} ms -> ds/bare {m['ds'] / m['bare']:.3f}x; CPU time ds/bare "
                  f"{c['ds'] / c['bare']:.3f}x   (load {load_average()})", flush=True)
    return args, rounds


def print_ways(rounds: list, names: dict, unit: str) -> None:
    """Each way's median over rounds and peak RSS, then the ratios (median over rounds of each round's ratio), of
    wall time and of the process's CPU time (on a shared machine wall time also counts waiting for a core)."""
    for way in rounds[0]:
        ms = median([r[way]["median"] for r in rounds]) * 1e3
        cpu = median([r[way]["cpu_median"] for r in rounds]) * 1e3
        rss = max(r[way]["peak_rss_mb"] for r in rounds)
        print(f"  {names[way]:<34} {ms:8.1f} ms/{unit} wall, {cpu:8.1f} ms CPU   peak RSS {rss:7.0f} MB")

    def ratio(a, b, key="median"):
        return median([r[a][key] / r[b][key] for r in rounds])

    for key, label in (("median", "wall"), ("cpu_median", "CPU ")):
        each = ", ".join(f"{r['ds'][key] / r['bare'][key]:.3f}" for r in rounds)
        print(f"  ds_distill / bare DeepSpeed, {label}: {ratio('ds', 'bare', key):.3f}x  (target <= 1.05x; "
              f"median of {len(rounds)} rounds: {each})")
    if "plain" in rounds[0]:
        print(f"  bare DeepSpeed / plain, wall : {ratio('bare', 'plain'):.3f}x")
        print(f"  ds_distill / plain, wall     : {ratio('ds', 'plain'):.3f}x")
    print(f"  load average at the end     : {load_average()} (1, 5, 15 min; this machine has {os.cpu_count()} cores)")


def main() -> int:
    args, rounds = three_ways(__file__, run_way, steps=8, batch=2)
    params = rounds[0]["bare"]["params"]
    print(f"one finetune step, Wan transformer {params / 1e6:.1f}M params, batch {args.batch}, "
          f"latent {list(LATENT)}, {args.threads} thread(s), ZeRO-3 persistence threshold 0, {args.rounds} rounds "
          f"of the median of {args.steps} steps after 2 warm-up")
    print_ways(rounds, {"plain": "plain PyTorch (fused AdamW)", "bare": "bare DeepSpeed ZeRO-3 engine",
                         "ds": "ds_distill finetune"}, "step")
    return 0


if __name__ == "__main__":
    sys.exit(main())

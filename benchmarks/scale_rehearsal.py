"""Host-memory rehearsal of DMD2 at Wan2.1-1.3B widths: 2 CPU ranks, bf16, ZeRO-3 with persistence threshold 0.

Writes a Wan2.1-1.3B-shaped transformer (dim 1536 = 12 heads x 128, ffn 8960, text_dim 4096, 16 latent
channels, freq_dim 256; `--layers` blocks, default 2) with random weights as a *sharded* Diffusers directory
like the hub's (`diffusion_pytorch_model-0000i-of-0000n.safetensors` + index json), plus the VAE config and a
text-only dataset. Then `torchrun --nproc_per_node 2` runs `python -m ds_distill.train`'s own `main` on a DMD2
recipe (student, teacher and critic all built under zero.Init and streamed from those shards) for 3 iterations
at 5 frames 64x64, text_len 16.

Each rank records, without changing what runs: peak RSS while loading (until the first forward), during the
iterations, and while saving the final checkpoint (the kernel's high-water mark, reset at each boundary; the
save is noted by a wrapper around DeepSpeedEngine.save_checkpoint that only reads the mark), and the most
ZeRO-3 parameter elements it ever held gathered at once (every module's forward, plus a thread sampling every
2 ms through backward and the optimizer steps). The parent prints them against DeepSpeed's own model-state
estimate for the three roles (`estimate_zero3_model_states_mem_needs`: trainable roles without offload; the
frozen teacher with its parameter-only term) plus the measured RSS of a process that only imports torch,
deepspeed, diffusers and ds_distill, and judges peak (load and iterations) <= 1.3x (estimate + imports) and
gathered < one role's size. The templates are the stock ones with persistence threshold 0 and, by default,
`--live 1e7` for max_live_parameters / max_reuse_distance / prefetch_bucket_size (`--stock-live`: the stock
1e9 / 1e9 / 5e7, under which ZeRO-3 keeps every used parameter gathered until the step ends).

    python benchmarks/scale_rehearsal.py [--layers 2] [--live 1e7 | --stock-live] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, cross_attn_norm=True, eps=1e-6, rope_max_seq_len=1024,
                qk_norm="rms_norm_across_heads")
TEXT_LEN = 16
RANKS = 2
SHARD = "150MB"
BOUND = 1.3
IMPORTS = "import torch, deepspeed, diffusers, safetensors, pyarrow, ds_distill.train, ds_distill.dispatch"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def write_inputs(root: Path, layers: int) -> dict:
    """The sharded model directory and a text-only dataset; returns the transformer's parameter counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from diffusers import WanTransformer3DModel

    from ds_distill.utils.dataset_schema import TEXT_ONLY_SCHEMA, tensor_to_bytes

    torch.manual_seed(0)
    model = WanTransformer3DModel(num_layers=layers, **WAN_1_3B).to(torch.bfloat16)
    counts = {"total": sum(p.numel() for p in model.parameters()),
              "largest_layer": max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())}
    model.save_pretrained(root / "model" / "transformer", max_shard_size=SHARD, safe_serialization=True)
    del model
    (root / "model" / "vae").mkdir(parents=True)
    (root / "model" / "vae" / "config.json").write_text(json.dumps(
        {"_class_name": "AutoencoderKLWan", "z_dim": 16, "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16}))
    (root / "model" / "model_index.json").write_text(json.dumps(
        {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
         "vae": ["diffusers", "AutoencoderKLWan"]}))
    g = torch.Generator().manual_seed(1)
    rows = [{"id": str(i), "text_embedding_bytes": tensor_to_bytes(torch.randn(TEXT_LEN, 4096, generator=g)),
             "text_embedding_shape": [TEXT_LEN, 4096], "text_embedding_dtype": "float32", "caption": f"prompt {i}"}
            for i in range(8)]
    (root / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=TEXT_ONLY_SCHEMA), root / "data" / "part-0.parquet")
    return counts


def write_recipe(root: Path, live: float | None) -> Path:
    """The DMD2 recipe and its templates: the stock ones with persistence threshold 0 and, unless `live` is None,
    stage3_max_live_parameters / max_reuse_distance / prefetch_bucket_size = `live` (the stock 1e9 lets ZeRO-3
    keep up to 1e9 used parameters gathered until the step ends: all of a 1.3B role)."""
    import yaml

    for name in ("zero3_train.json", "zero3_inference.json"):
        template = json.loads((REPO / "ds_configs" / name).read_text())
        zero = template["zero_optimization"]
        zero["stage3_param_persistence_threshold"] = 0
        if live is not None:
            for key in ("stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_prefetch_bucket_size"):
                zero[key] = live
        (root / name).write_text(json.dumps(template))
    model = str(root / "model")
    recipe = {
        "recipe": {"family": "wan", "method": "dmd2"},
        "roles": {"student": {"path": model, "trainable": True}, "teacher": {"path": model, "trainable": False},
                  "critic": {"path": model, "trainable": True}},
        "training": {"output_dir": str(root / "out"), "data_path": str(root / "data"), "max_train_steps": 3,
                     "train_batch_size": 1, "dataloader_num_workers": 0, "mixed_precision": "bf16",
                     "learning_rate": 2e-6, "max_grad_norm": 1.0, "text_len": TEXT_LEN, "num_frames": 5,
                     "height": 64, "width": 64, "gradient_checkpointing": True, "uncond_embedding": "zeros",
                     "trackers": ["none"], "checkpointing_steps": 1000, "log_validation": False,
                     "ds_config": str(root / "zero3_train.json"),
                     "ds_config_inference": str(root / "zero3_inference.json")},
        "pipeline_config": {"flow_shift": 3.0},
        "method_config": {"rollout_mode": "simulate", "dmd_denoising_steps": [1000, 750, 500, 250],
                          "generator_update_interval": 1, "real_score_guidance_scale": 3.0},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# -- inside each rank ------------------------------------------------------------------------------------
def _read_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Watch:
    """Peak RSS per phase and the most ZeRO-3 parameter elements gathered at once on this rank."""

    def __init__(self):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        self.gathered_states = (ZeroParamStatus.AVAILABLE, ZeroParamStatus.INFLIGHT)
        self.params: dict[int, object] = {}
        self.max_gathered = 0
        self.phase = "load"
        self.peak_load = 0
        self.peak_train = 0
        self.reset_ok = False
        self.done = threading.Event()
        self.label = "load"
        self.rss_peaks: dict[str, int] = {}

    def gathered(self) -> int:
        return sum(p.ds_numel for p in list(self.params.values()) if p.ds_status in self.gathered_states)

    def note(self) -> None:
        n = self.gathered()
        if n > self.max_gathered:
            self.max_gathered = n

    def pre_forward(self, module, _args) -> None:
        if self.phase == "load":  # the first forward ends loading
            self.peak_load = _read_status("VmHWM")
            self.reset_ok = _reset_peak()
            self.phase = "train"
        for p in module.parameters(recurse=False):
            if hasattr(p, "ds_id"):
                self.params[p.ds_id] = p

    def post_forward(self, _module, _args, _out) -> None:
        self.note()

    def before_save(self) -> None:
        """The first checkpoint save ends the training phase (its memory is reported on its own)."""
        if self.phase == "train":
            self.peak_train = _read_status("VmHWM")
            self.reset_ok = self.reset_ok and _reset_peak()
            self.phase = "save"

    def sample(self) -> None:
        while not self.done.wait(0.002):
            self.note()
            rss, label = _read_status("VmRSS"), self.label
            if rss > self.rss_peaks.get(label, 0):
                self.rss_peaks[label] = rss


def rank_main(config: str, out_json: str) -> int:
    import torch

    watch = Watch()
    pre = torch.nn.modules.module.register_module_forward_pre_hook(watch.pre_forward)
    post = torch.nn.modules.module.register_module_forward_hook(watch.post_forward)
    sampler = threading.Thread(target=watch.sample, daemon=True)
    sampler.start()
    from deepspeed.runtime.engine import DeepSpeedEngine

    save = DeepSpeedEngine.save_checkpoint

    def noted_save(engine, *args, **kwargs):  # records the peak so far, then saves as before
        watch.before_save()
        return save(engine, *args, **kwargs)

    DeepSpeedEngine.save_checkpoint = noted_save
    engines: dict[int, int] = {}

    def labelled(name: str):  # sets the phase label the sampler files its RSS readings under
        original = getattr(DeepSpeedEngine, name)

        def call(engine, *args, **kwargs):
            index = engines.setdefault(id(engine), len(engines))
            before, watch.label = watch.label, f"{name} engine {index}"
            try:
                return original(engine, *args, **kwargs)
            finally:
                watch.label = before if name == "forward" else f"after {name} engine {index}"

        setattr(DeepSpeedEngine, name, call)

    for name in ("forward", "backward", "step"):
        labelled(name)
    from ds_distill.train import main

    started = time.perf_counter()
    code = main(["--config", config])
    watch.done.set()
    sampler.join()
    pre.remove()
    post.remove()
    end = _read_status("VmHWM")
    saved = watch.phase == "save"
    result = {"rank": int(os.environ.get("RANK", 0)), "code": code, "peak_load": watch.peak_load,
              "peak_train": watch.peak_train if saved else end, "peak_save": end if saved else 0,
              "peak_train_is_own": watch.reset_ok,
              "max_gathered": watch.max_gathered, "rss_peaks": watch.rss_peaks, "zero_params": len(watch.params),
              "seconds": time.perf_counter() - started}
    Path(out_json.replace("{rank}", str(result["rank"]))).write_text(json.dumps(result))
    return 0 if code in (0, None) else int(code)


# -- the parent ------------------------------------------------------------------------------------------
def import_cost(env: dict) -> int:
    code = f"{IMPORTS}\nimport resource\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def estimates(counts: dict) -> dict[str, int]:
    """DeepSpeed's model-state estimate per rank for each role (host memory: the CPU accelerator's "GPU")."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    def per_rank(offload: bool) -> int:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            counts["total"], counts["largest_layer"], num_gpus_per_node=RANKS, num_nodes=1,
            cpu_offload=offload, cpu_offload_params=False, zero_init=True)
        # cpu_offload=True, params not offloaded: `gpu` is the parameters alone (what a frozen role keeps);
        # without offload `gpu` holds the parameters, gradients and Adam states, `cpu` the node's zero.Init buffer
        return gpu if offload else gpu + cpu // RANKS

    trainable, frozen = per_rank(False), per_rank(True)
    return {"student": trainable, "critic": trainable, "teacher": frozen}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2, help="transformer blocks per role (Wan2.1-1.3B has 30)")
    p.add_argument("--keep", help="write the model, data and run here (kept) instead of a temporary folder")
    p.add_argument("--live", type=float, default=1e7,
                   help="stage3_max_live_parameters, max_reuse_distance and prefetch_bucket_size (default 1e7)")
    p.add_argument("--stock-live", action="store_true", help="keep the stock templates' 1e9 / 1e9 / 5e7 for those")
    p.add_argument("--_rank", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._rank:
        return rank_main(*args._rank)
    if args.layers < 1:
        print(f"--layers {args.layers}: must be at least 1")
        return 2
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_DISTILL_NO_TQDM="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        counts = write_inputs(root, args.layers)
        shards = sorted(p.name for p in (root / "model" / "transformer").glob("*.safetensors"))
        index = list((root / "model" / "transformer").glob("*.index.json"))
        print(f"Wan2.1-1.3B widths, {args.layers} blocks: {counts['total'] / 1e6:.1f}M params per role "
              f"(largest layer {counts['largest_layer'] / 1e6:.1f}M), bf16, written as {len(shards)} shards "
              f"({shards[0]} ... {shards[-1]}) + {index[0].name if index else 'NO INDEX'} "
              f"in {time.perf_counter() - start:.0f} s", flush=True)
        if len(shards) < 2 or not index:
            print("FAIL: the model was not written sharded")
            return 1
        live = None if args.stock_live else args.live
        recipe = write_recipe(root, live)
        print("templates: stock ZeRO-3 train / inference with stage3_param_persistence_threshold 0"
              + ("" if live is None else f", stage3_max_live_parameters = max_reuse_distance = prefetch_bucket_size "
                 f"= {live:g}"), flush=True)
        imports = import_cost(env)
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}",
               str(Path(__file__).resolve()), "--_rank", str(recipe), str(root / "rank_{rank}.json")]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        ranks = []
        for r in range(RANKS):
            f = root / f"rank_{r}.json"
            if f.is_file():
                ranks.append(json.loads(f.read_text()))
        if run.returncode != 0 or len(ranks) != RANKS:
            print(run.stdout[-3000:], run.stderr[-6000:])
            print(f"FAIL: the 2-rank run exited {run.returncode}")
            return 1
    est = estimates(counts)
    est_total = sum(est.values())
    budget = BOUND * (est_total + imports)
    role_bytes = counts["total"] * 2
    print(f"2 ranks (torchrun, gloo), 3 DMD2 iterations at 5x64x64, text_len {TEXT_LEN}: {wall:.0f} s")
    print("DeepSpeed's model-state estimate per rank (estimate_zero3_model_states_mem_needs, 2 ranks, zero_init):")
    for role, b in est.items():
        kind = "trainable, no offload" if role != "teacher" else "frozen: parameter term only"
        print(f"  {role:<8} {gib(b)}  ({kind})")
    print(f"  imports  {gib(imports)}  (RSS of a process that only runs: {IMPORTS})")
    print(f"  budget   {BOUND} x ({gib(est_total)} + {gib(imports)}) = {gib(budget)}")
    ok = True
    for r in ranks:
        peak = max(r["peak_load"], r["peak_train"])
        fits = peak <= budget
        whole = r["max_gathered"] >= counts["total"]
        ok &= fits and not whole and r["zero_params"] > 0
        note = "" if r["peak_train_is_own"] else " (peak mark could not be reset: training figure includes load)"
        print(f"rank {r['rank']}: peak RSS at load {gib(r['peak_load'])}, during the 3 iterations "
              f"{gib(r['peak_train'])}{note} -> {peak / (est_total + imports):.2f}x (estimate + imports) "
              f"[{'ok' if fits else 'OVER'} <= {BOUND}x]; while saving the final checkpoint "
              f"{gib(r['peak_save'])} ({r['peak_save'] / (est_total + imports):.2f}x)")
        print(f"rank {r['rank']}: most ZeRO-3 elements gathered at once {r['max_gathered'] / 1e6:.1f}M of "
              f"{r['zero_params']} partitioned tensors = {r['max_gathered'] / counts['total']:.0%} of one role "
              f"({counts['total'] / 1e6:.1f}M, {gib(role_bytes)} in bf16): "
              f"{'never a whole role' if not whole else 'HELD A WHOLE ROLE'}")
    for r in ranks:
        top = sorted(r["rss_peaks"].items(), key=lambda kv: -kv[1])[:6]
        print(f"rank {r['rank']}: highest RSS samples by phase (engines numbered in order of first use): "
              + "; ".join(f"{k} {gib(v)}" for k, v in top))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

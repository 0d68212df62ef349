"""Checkpoint size and optimizer state per rank: LoRA vs full finetuning, at Wan2.1-1.3B widths.

Writes a Wan2.1-1.3B-shaped transformer (dim 1536, 12 heads, ffn 8960, text_dim 4096; `--layers` blocks, default
2; the writer of benchmarks/scale_rehearsal.py) and a small latent dataset, then runs `ds_distill.train` twice on
2 CPU ranks (bf16, ZeRO-3, persistence threshold 0, 2 steps): once training every weight, once with LoRA (rank
`--rank`, alpha = rank, the default targets to_q, to_k, to_v, to_out.0). For each run it prints the trained
parameter count, the checkpoint's size on disk, and per rank the optimizer-state file and the optimizer's tensors
(fp32 master + Adam moments) it holds; then full / LoRA ratios. At full depth (30 blocks) both counts scale with
the blocks, so the ratio printed here is close to the 30-layer one (printed from the meta-device model too).

    python benchmarks/lora_memory.py [--layers 2] [--rank 32] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.scale_rehearsal import WAN_1_3B, write_inputs  # noqa: E402

RANKS = 2
TEXT_LEN = 16


def write_latents(root: Path) -> Path:
    """8 rows of 16x2x8x8 latents (5 frames of 64x64) with 4096-dim text embeddings."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from ds_distill.utils.dataset_schema import T2V_SCHEMA, tensor_to_bytes

    g = torch.Generator().manual_seed(2)
    rows = []
    for i in range(8):
        lat = torch.randn(16, 2, 8, 8, generator=g)
        rows.append({"id": str(i), "vae_latent_bytes": tensor_to_bytes(lat), "vae_latent_shape": list(lat.shape),
                     "vae_latent_dtype": "float32",
                     "text_embedding_bytes": tensor_to_bytes(torch.randn(TEXT_LEN, 4096, generator=g)),
                     "text_embedding_shape": [TEXT_LEN, 4096], "text_embedding_dtype": "float32",
                     "file_name": f"{i}.mp4", "caption": f"prompt {i}", "media_type": "video", "width": 64,
                     "height": 64, "num_frames": 5, "duration_sec": 0.3, "fps": 16.0})
    folder = root / "latents"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=T2V_SCHEMA), folder / "part-0.parquet")
    return folder


def write_recipe(root: Path, data: Path, name: str, lora: dict | None) -> Path:
    import yaml

    template = json.loads((REPO / "ds_configs" / "zero3_train.json").read_text())
    template["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (root / "zero3_train_t0.json").write_text(json.dumps(template))
    student = {"path": str(root / "model"), "trainable": True}
    if lora is not None:
        student["lora"] = lora
    recipe = {
        "recipe": {"family": "wan", "method": "finetune"},
        "roles": {"student": student},
        "training": {"output_dir": str(root / name), "data_path": str(data), "max_train_steps": 2,
                     "train_batch_size": 1, "dataloader_num_workers": 0, "mixed_precision": "bf16",
                     "learning_rate": 1e-4, "max_grad_norm": 1.0, "text_len": TEXT_LEN, "num_frames": 5,
                     "height": 64, "width": 64, "gradient_checkpointing": True, "uncond_embedding": "zeros",
                     "trackers": ["none"], "checkpointing_steps": 0, "log_validation": False,
                     "ds_config": str(root / "zero3_train_t0.json")},
        "pipeline_config": {"flow_shift": 3.0},
        "method_config": {"weighting_scheme": "uniform"},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run(recipe: Path) -> None:
    launcher = str(Path(sys.executable).parent / "deepspeed")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    res = subprocess.run([launcher, "--num_gpus", str(RANKS), "--module", "ds_distill.train", "--config",
                          str(recipe)], cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"training {recipe.name} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")


def measure(out: Path) -> dict:
    """Trained parameter count, checkpoint bytes on disk, and per rank the optimizer file and state tensors."""
    import torch

    role = out / "checkpoint-2" / "student"
    states = torch.load(next(role.glob("*model_states.pt")), map_location="cpu", weights_only=False)
    trained = sum(int(torch.Size(s).numel()) for g in states["param_shapes"] for s in g.values())
    disk = sum(p.stat().st_size for p in (out / "checkpoint-2").rglob("*") if p.is_file())
    ranks = []
    for r in range(RANKS):
        f = next(role.glob(f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
        osd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        master = sum(t.numel() * t.element_size() for t in osd["fp32_flat_groups"])
        moments = sum(v.numel() * v.element_size() for s in osd["optimizer_state_dict"]["state"].values()
                      for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
        ranks.append({"file": f.stat().st_size, "state": master + moments})
    return {"trained": trained, "disk": disk, "ranks": ranks}


def counts_at_depth(layers: int, rank: int) -> tuple[int, int]:
    """(all parameters, LoRA parameters) of the 1.3B-width model at `layers` blocks, on the meta device."""
    from ds_distill.preflight import meta_model
    from ds_distill.utils.config import LoraSpec
    from ds_distill.utils.module_state import lora_parameter_names

    config = {**WAN_1_3B, "num_layers": layers}
    full = sum(p.numel() for p in meta_model(config).parameters())
    model = meta_model(config, LoraSpec(rank=rank, alpha=float(rank)))
    params = dict(model.named_parameters())
    return full, sum(params[n].numel() for n in lora_parameter_names(model))


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--keep", default=None, help="work in this folder and keep it")
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lora_memory_"))
    root.mkdir(parents=True, exist_ok=True)
    write_inputs(root, args.layers)
    data = write_latents(root)
    results = {}
    for name, lora in (("full", None), ("lora", {"rank": args.rank, "alpha": float(args.rank)})):
        run(write_recipe(root, data, name, lora))
        results[name] = measure(root / name)
    full, lora = results["full"], results["lora"]
    print(f"Wan2.1-1.3B width, {args.layers} blocks, {RANKS} ranks, bf16, ZeRO-3 (threshold 0); LoRA rank "
          f"{args.rank} on to_q/to_k/to_v/to_out.0")
    print(f"{'':24}{'full':>16}{'LoRA':>16}{'full/LoRA':>12}")
    print(f"{'trained parameters':24}{full['trained']:>16,}{lora['trained']:>16,}"
          f"{full['trained'] / lora['trained']:>11.1f}x")
    print(f"{'checkpoint on disk':24}{mb(full['disk']):>16}{mb(lora['disk']):>16}{full['disk'] / lora['disk']:>11.1f}x")
    for r in range(RANKS):
        f, l = full["ranks"][r], lora["ranks"][r]
        print(f"{f'rank {r} optimizer file':24}{mb(f['file']):>16}{mb(l['file']):>16}{f['file'] / l['file']:>11.1f}x")
        print(f"{f'rank {r} optimizer state':24}{mb(f['state']):>16}{mb(l['state']):>16}"
              f"{f['state'] / l['state']:>11.1f}x")
    n_full, n_lora = counts_at_depth(30, args.rank)
    print(f"at 30 blocks (Wan2.1-1.3B): {n_full:,} parameters vs {n_lora:,} adapter parameters "
          f"({n_full / n_lora:.1f}x); optimizer state (fp32 master + 2 moments, 12 B each) "
          f"{mb(12 * n_full / RANKS)} vs {mb(12 * n_lora / RANKS)} per rank on {RANKS} ranks")
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

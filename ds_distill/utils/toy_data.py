"""`ds-distill make-toy-data OUT --model TINY_WAN`: a toy dataset whose distribution is known exactly.

Each caption owns a few *modes*: smooth latent patterns. A row is one mode plus a little Gaussian noise,
so the data distribution per caption is a known Gaussian mixture. That makes learning measurable: a
sample's distance to the nearest mode of its caption says how sharp it is, and which modes samples land
on says whether the model covers the distribution. Latents are stored in raw VAE space (the family
normalises them with the VAE's latents_mean/std); text embeddings come from the model's own text encoder,
so validation prompts encoded at run time condition exactly as the training rows do.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

TOY_CAPTIONS = [
    "a red ball bouncing on the floor",
    "a blue cube spinning in space",
    "a green wave rolling over sand",
    "a yellow star twinkling at night",
]

MODES_FILE = "toy_modes.safetensors"


@dataclass
class ToyDataConfig:
    """Shape and size of the toy dataset."""

    rows_per_caption: int = 64
    modes_per_caption: int = 2
    spread: float = 0.1
    num_frames: int = 5
    height: int = 64
    width: int = 64
    num_files: int = 2
    text_len: int = 16
    latent_dtype: str = "float32"
    text_dtype: str = "float32"
    seed: int = 0


def mode_centers(num_captions: int, modes: int, latent_shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Smooth, unit-RMS latent patterns [K, M, C, T, H, W] in normalised latent space."""
    c, t, h, w = latent_shape
    g = torch.Generator().manual_seed(10_000 + seed)
    coarse = torch.randn(num_captions * modes, c * t, 2, 2, generator=g)
    fine = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)
    fine = fine.reshape(num_captions, modes, c, t, h, w)
    rms = fine.pow(2).mean(dim=(2, 3, 4, 5), keepdim=True).sqrt()
    return fine / rms


def score_samples(samples: torch.Tensor, caption_index: torch.Tensor, centers: torch.Tensor) -> dict:
    """How close normalised-latent samples are to the toy distribution of their captions.

    - `mode_mse`: mean over samples of the squared distance (per element) to the nearest mode of the caption;
      data itself scores spread**2.
    - `coverage`: fraction of (caption, mode) pairs that at least one sample lands nearest to.
    - `balance`: 1 - total variation between the nearest-mode histogram and the uniform mixture weights.
    """
    samples = samples.float().flatten(1)
    k, m = centers.shape[:2]
    flat = centers.float().reshape(k, m, -1)
    per_sample = []
    hits = torch.zeros(k, m)
    for x, ci in zip(samples, caption_index.tolist()):
        d = (flat[ci] - x).pow(2).mean(dim=1)
        j = int(d.argmin())
        per_sample.append(float(d[j]))
        hits[ci, j] += 1
    counts = hits.sum(dim=1, keepdim=True).clamp_min(1)
    present = hits.sum(dim=1) > 0
    tv = 0.5 * (hits / counts - 1.0 / m).abs().sum(dim=1)
    return {
        "mode_mse": sum(per_sample) / max(len(per_sample), 1),
        "coverage": float((hits > 0).float()[present].mean()) if present.any() else 0.0,
        "balance": float(1 - tv[present].mean()) if present.any() else 0.0,
    }


def _vae_stats(model_dir: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    cfg = json.loads((model_dir / "vae" / "config.json").read_text())
    mean = torch.tensor(cfg["latents_mean"], dtype=torch.float32)
    std = torch.tensor(cfg["latents_std"], dtype=torch.float32)
    return mean, std, cfg


def make_toy_data(out_dir: str | Path, model_dir: str | Path, cfg: ToyDataConfig | None = None) -> Path:
    """Write the toy dataset (parquet files, text-only variant, validation prompts, mode centers)."""
    from safetensors.torch import save_file

    from ds_distill.models.wan import encode_prompts, latent_shape_for
    from ds_distill.utils.dataset_schema import T2V_SCHEMA, TEXT_ONLY_SCHEMA, tensor_to_bytes, torch_dtype

    cfg = cfg or ToyDataConfig()
    out, model_dir = Path(out_dir), Path(model_dir)
    mean, std, vae_cfg = _vae_stats(model_dir)
    shape = latent_shape_for(vae_cfg, cfg.num_frames, cfg.height, cfg.width)
    centers = mode_centers(len(TOY_CAPTIONS), cfg.modes_per_caption, shape, cfg.seed)
    embeds = encode_prompts(model_dir, TOY_CAPTIONS, text_len=cfg.text_len)

    g = torch.Generator().manual_seed(cfg.seed)
    rows = []
    for i in range(cfg.rows_per_caption * len(TOY_CAPTIONS)):
        ci = i % len(TOY_CAPTIONS)
        mode = int(torch.randint(cfg.modes_per_caption, (1,), generator=g))
        z = centers[ci, mode] + cfg.spread * torch.randn(shape, generator=g)
        raw = z * std.view(-1, 1, 1, 1) + mean.view(-1, 1, 1, 1)
        latent = raw.to(torch_dtype(cfg.latent_dtype))
        text = embeds[ci].to(torch_dtype(cfg.text_dtype))
        rows.append(
            {
                "id": f"toy-{i:05d}",
                "vae_latent_bytes": tensor_to_bytes(latent),
                "vae_latent_shape": list(latent.shape),
                "vae_latent_dtype": cfg.latent_dtype,
                "text_embedding_bytes": tensor_to_bytes(text),
                "text_embedding_shape": list(text.shape),
                "text_embedding_dtype": cfg.text_dtype,
                "file_name": f"toy-{i:05d}.mp4",
                "caption": TOY_CAPTIONS[ci],
                "media_type": "video",
                "width": cfg.width,
                "height": cfg.height,
                "num_frames": cfg.num_frames,
                "duration_sec": cfg.num_frames / 16.0,
                "fps": 16.0,
            }
        )

    (out / "latents").mkdir(parents=True, exist_ok=True)
    per_file = -(-len(rows) // cfg.num_files)
    for f in range(cfg.num_files):
        chunk = rows[f * per_file : (f + 1) * per_file]
        if chunk:
            pq.write_table(pa.Table.from_pylist(chunk, schema=T2V_SCHEMA), out / "latents" / f"part-{f:05d}.parquet")

    (out / "text_only").mkdir(exist_ok=True)
    text_rows = [{k: r[k] for k in TEXT_ONLY_SCHEMA.names} for r in rows]
    pq.write_table(pa.Table.from_pylist(text_rows, schema=TEXT_ONLY_SCHEMA), out / "text_only" / "prompts.parquet")

    validation = {
        "data": [
            {
                "caption": c,
                "num_inference_steps": 50,
                "height": cfg.height,
                "width": cfg.width,
                "num_frames": cfg.num_frames,
            }
            for c in TOY_CAPTIONS
        ]
    }
    (out / "validation.json").write_text(json.dumps(validation, indent=2))
    save_file(
        {"centers": centers.contiguous()},
        str(out / MODES_FILE),
        metadata={"captions": json.dumps(TOY_CAPTIONS), "spread": str(cfg.spread), "text_len": str(cfg.text_len)},
    )
    return out


def load_mode_centers(data_dir: str | Path) -> tuple[torch.Tensor, list[str]]:
    """The toy dataset's mode centers [K, M, C, T, H, W] and the caption of each K."""
    from safetensors import safe_open

    with safe_open(str(Path(data_dir) / MODES_FILE), "pt") as f:
        centers = f.get_tensor("centers")
        captions = json.loads(f.metadata()["captions"])
    return centers, captions


def main(argv: list[str] | None = None) -> int:
    """CLI: ds-distill make-toy-data OUT --model TINY_WAN."""
    parser = argparse.ArgumentParser(prog="ds-distill make-toy-data", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output directory")
    parser.add_argument("--model", required=True, help="Wan directory whose text encoder and VAE stats to use")
    parser.add_argument("--rows-per-caption", type=int, default=ToyDataConfig.rows_per_caption)
    parser.add_argument("--modes", type=int, default=ToyDataConfig.modes_per_caption)
    parser.add_argument("--text-len", type=int, default=ToyDataConfig.text_len)
    parser.add_argument("--latent-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = ToyDataConfig(
        rows_per_caption=args.rows_per_caption,
        modes_per_caption=args.modes,
        text_len=args.text_len,
        latent_dtype=args.latent_dtype,
        seed=args.seed,
    )
    out = make_toy_data(args.out, args.model, cfg)
    print(f"toy dataset written to {out} (latents/, text_only/, validation.json, {MODES_FILE})")
    return 0

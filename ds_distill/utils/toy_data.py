"""`ds-distill make-toy-data OUT --model TINY_WAN`: a toy dataset whose distribution is known exactly.

Each caption k owns a smooth latent pattern c_k and a 2-D plane spanned by two orthonormal directions U_k
(local to one latent patch).
A row is x0 = c_k + z1 U_k1 + z2 U_k2 + a little isotropic noise, where z is drawn from a mixture of
Gaussians on a ring (four equally weighted modes by default; `--modes`, `--mode-weights` and the clip size
`--num-frames/--height/--width` make other mixtures and latent sizes, so a recipe can be judged on data it was not
tuned on). The directions have unit norm over the whole latent, so at the noise
levels a few-step sampler ends on (sigma ~ 0.5) the modes are ambiguous: a few-step sampler of a good
teacher averages them (its z shrinks towards the ring's centre) while a many-step sampler, or a
distilled student, lands on them. Scores project samples onto (c_k, U_k) and compare z with the mixture.

Latents are stored in raw VAE space (the family normalises them with the VAE's latents_mean/std); text
embeddings come from the model's own text encoder, so validation prompts encoded at run time condition
exactly as the training rows do.

An existing non-empty OUT is refused unless `--overwrite`, which replaces only a toy dataset (a folder with
toy_modes.safetensors): the new one is written beside it and swapped in when complete.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from ds_distill.cli import ArgumentParser, check_output_dir, require_components, write_aside_then_swap
from ds_distill.errors import UserError, exit_on_user_error

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
    modes: int = 4
    mode_weights: list[float] | None = None
    """Relative weight of each mode (None: equal); normalised to sum to 1."""
    radius: float = 1.5
    mode_std: float = 0.15
    noise: float = 0.03
    num_frames: int = 5
    height: int = 32
    width: int = 32
    num_files: int = 2
    text_len: int = 16
    latent_dtype: str = "float32"
    text_dtype: str = "float32"
    seed: int = 0


@dataclass
class ToyDistribution:
    """The known distribution: centers [K, *latent], planes [K, 2, *latent] (orthonormal), mode z's [M, 2] and
    the mixture weights [M] (sum 1)."""

    centers: torch.Tensor
    planes: torch.Tensor
    modes: torch.Tensor
    mode_std: float
    captions: list[str]
    weights: torch.Tensor | None = None

    def __post_init__(self):
        if self.weights is None:
            m = self.modes.shape[0]
            self.weights = torch.full((m,), 1.0 / m)

    def project(self, x: torch.Tensor, caption_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z [N, 2] of normalised-latent samples in their caption's plane, and the off-plane RMS [N]."""
        x = x.float().flatten(1)
        c = self.centers.flatten(1)[caption_index]
        u = self.planes.flatten(2)[caption_index]  # [N, 2, D]
        d = x - c
        z = torch.einsum("nkd,nd->nk", u, d)
        rest = d - torch.einsum("nk,nkd->nd", z, u)
        return z, rest.pow(2).mean(dim=1).sqrt()


def toy_distribution(num_captions: int, latent_shape: tuple[int, ...], cfg: ToyDataConfig) -> ToyDistribution:
    """Draw the (seeded) centers, planes and mode positions."""
    c, t, h, w = latent_shape
    g = torch.Generator().manual_seed(10_000 + cfg.seed)
    coarse = torch.randn(num_captions, c * t, 2, 2, generator=g)
    centers = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True).reshape(num_captions, c, t, h, w)
    centers = centers / centers.pow(2).mean(dim=(1, 2, 3, 4), keepdim=True).sqrt()
    # Caption k's plane lives in one 2x2 latent patch (one transformer token) of frame 0: a local,
    # low-amplitude structure, ambiguous under the noise a few-step sampler ends on.
    planes = torch.zeros(num_captions, 2, c, t, h, w)
    blocks = [(i, j) for i in range(0, h - 1, 2) for j in range(0, w - 1, 2)]
    for k in range(num_captions):
        q = torch.linalg.qr(torch.randn(c * 4, 2, generator=g)).Q.T  # 2 orthonormal rows over the patch
        i, j = blocks[k % len(blocks)]
        planes[k, :, :, 0, i : i + 2, j : j + 2] = q.reshape(2, c, 2, 2)
    angles = torch.arange(cfg.modes) * (2 * math.pi / cfg.modes) + math.pi / 4
    modes = cfg.radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    weights = torch.tensor(cfg.mode_weights, dtype=torch.float32) if cfg.mode_weights else torch.ones(cfg.modes)
    return ToyDistribution(centers, planes.contiguous(), modes, cfg.mode_std,
                           list(TOY_CAPTIONS[:num_captions]), weights / weights.sum())


def score_samples(samples: torch.Tensor, caption_index: torch.Tensor, dist: ToyDistribution) -> dict:
    """How close normalised-latent samples are to the toy distribution of their captions.

    - `mode_dist`: mean distance in the caption's plane from z to the nearest mixture mode (data: ~1.25 x mode_std).
    - `radius`: mean |z| (data: the ring radius; averaging modes shrinks it).
    - `coverage`: fraction of (caption, mode) pairs some sample lands nearest to.
    - `balance`: 1 - total variation between the nearest-mode histogram and the mixture weights (1: the data's mix).
    - `off_plane`: RMS of what lies outside the caption's center + plane (data: the isotropic noise).
    """
    z, off = dist.project(samples, caption_index)
    d = torch.cdist(z, dist.modes)
    nearest = d.argmin(dim=1)
    k, m = dist.centers.shape[0], dist.modes.shape[0]
    hits = torch.zeros(k, m)
    for ci, j in zip(caption_index.tolist(), nearest.tolist()):
        hits[ci, j] += 1
    present = hits.sum(dim=1) > 0
    frac = hits[present] / hits[present].sum(dim=1, keepdim=True)
    weights = dist.weights.view(1, m)
    return {
        "mode_dist": float(d.min(dim=1).values.mean()),
        "radius": float(z.norm(dim=1).mean()),
        "coverage": float((hits[present] > 0).float().mean()),
        "balance": float(1 - 0.5 * (frac - weights).abs().sum(dim=1).mean()),
        "off_plane": float(off.mean()),
    }


def is_toy_dataset(path: Path) -> bool:
    """A folder make-toy-data wrote (the only kind its --overwrite replaces)."""
    return (path / MODES_FILE).is_file()


def check_toy_config(cfg: ToyDataConfig, vae_cfg: dict, patch_size) -> None:
    """Counts at least 1, positive finite spreads and weights, and a clip size the VAE and the 2x2 patches divide."""
    for f in fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if f.name == "mode_weights":
            if value is not None and len(value) != cfg.modes:
                raise UserError(f"{flag}: {len(value)} weights for {cfg.modes} modes (--modes); give one per mode")
            if value is not None and not all(0 < w < float("inf") for w in value):
                raise UserError(f"{flag} {','.join(map(str, value))}: weights must be positive finite numbers")
        elif f.name in ("radius", "mode_std", "noise"):
            if not 0 <= value < float("inf"):
                raise UserError(f"{flag} {value}: must be a finite number >= 0")
        elif isinstance(value, int) and f.name != "seed" and value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    temporal = int(vae_cfg.get("scale_factor_temporal", 4))
    if (cfg.num_frames - 1) % temporal:
        raise UserError(f"num_frames {cfg.num_frames}: the VAE needs {temporal}k+1 frames")
    spatial = int(vae_cfg.get("scale_factor_spatial", 8))
    for key, patch in (("height", patch_size[1]), ("width", patch_size[2])):
        if getattr(cfg, key) % (spatial * patch):
            raise UserError(f"{key} {getattr(cfg, key)}: must be a multiple of {spatial * patch} "
                            f"({spatial}x VAE, {patch}x patches)")


def _vae_stats(model_dir: Path, flag: str = "--model") -> tuple[torch.Tensor, torch.Tensor, dict]:
    cfg = require_components(model_dir, flag, ("vae", "text_encoder", "tokenizer"))["vae"]
    mean, std, c = cfg.get("latents_mean"), cfg.get("latents_std"), cfg.get("z_dim", 16)
    for key, value in (("latents_mean", mean), ("latents_std", std)):
        if not (isinstance(value, list) and len(value) == c and all(isinstance(v, (int, float)) for v in value)):
            raise UserError(f"{flag} {model_dir}: vae/config.json: {key} must be a list of {c} numbers (z_dim)")
    if not all(0 < v < float("inf") for v in std):
        raise UserError(f"{flag} {model_dir}: vae/config.json: latents_std must be positive numbers")
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32), cfg


def make_toy_data(out_dir: str | Path, model_dir: str | Path, cfg: ToyDataConfig | None = None,
                  overwrite: bool = False) -> Path:
    """Write the toy dataset (parquet files, text-only variant, validation prompts, mode centers)."""
    from ds_distill.models.components import read_components, resolve_model_dir

    cfg = cfg or ToyDataConfig()
    model_dir = resolve_model_dir(str(model_dir), "ds-distill make-toy-data", "--model")
    mean, std, vae_cfg = _vae_stats(model_dir)
    check_toy_config(cfg, vae_cfg, read_components(model_dir).transformer_config.get("patch_size") or (1, 2, 2))
    out = check_output_dir(out_dir, "make-toy-data OUT", overwrite, swap=True, replaceable=is_toy_dataset,
                           what=f"a toy dataset (a folder with {MODES_FILE})")
    with write_aside_then_swap(out) as new:
        _write_toy_data(new, model_dir, cfg, mean, std, vae_cfg)
    return out


def _write_toy_data(out: Path, model_dir: Path, cfg: ToyDataConfig, mean: torch.Tensor, std: torch.Tensor,
                    vae_cfg: dict) -> None:
    from safetensors.torch import save_file

    from ds_distill.models.wan_common import encode_prompts, latent_shape_for
    from ds_distill.utils.dataset_schema import T2V_SCHEMA, TEXT_ONLY_SCHEMA, tensor_to_bytes, torch_dtype

    shape = latent_shape_for(vae_cfg, cfg.num_frames, cfg.height, cfg.width)
    dist = toy_distribution(len(TOY_CAPTIONS), shape, cfg)
    embeds = encode_prompts(model_dir, TOY_CAPTIONS, text_len=cfg.text_len)

    g = torch.Generator().manual_seed(cfg.seed)
    rows = []
    for i in range(cfg.rows_per_caption * len(TOY_CAPTIONS)):
        ci = i % len(TOY_CAPTIONS)
        if cfg.mode_weights is None:  # the default data stays draw-for-draw what it always was
            mode = int(torch.randint(cfg.modes, (1,), generator=g))
        else:
            mode = int(torch.multinomial(dist.weights, 1, generator=g))
        z_ = dist.modes[mode] + cfg.mode_std * torch.randn(2, generator=g)
        x0 = dist.centers[ci] + z_[0] * dist.planes[ci, 0] + z_[1] * dist.planes[ci, 1]
        x0 = x0 + cfg.noise * torch.randn(shape, generator=g)
        raw = x0 * std.view(-1, 1, 1, 1) + mean.view(-1, 1, 1, 1)
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
        {"centers": dist.centers.contiguous(), "planes": dist.planes, "modes": dist.modes.contiguous(),
         "weights": dist.weights.contiguous()},
        str(out / MODES_FILE),
        metadata={"captions": json.dumps(dist.captions), "mode_std": str(cfg.mode_std), "text_len": str(cfg.text_len)},
    )


def load_toy_distribution(data_dir: str | Path) -> ToyDistribution:
    """The known distribution a toy dataset was drawn from."""
    from safetensors import safe_open

    from ds_distill.errors import DataError

    path = Path(data_dir) / MODES_FILE
    if not path.is_file():
        raise DataError(f"{data_dir}: not a toy dataset (no {MODES_FILE}; make one with ds-distill make-toy-data)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            weights = f.get_tensor("weights") if "weights" in f.keys() else None  # older files: equal weights
            return ToyDistribution(f.get_tensor("centers"), f.get_tensor("planes"), f.get_tensor("modes"),
                                   float(meta["mode_std"]), json.loads(meta["captions"]), weights)
    except Exception as exc:  # safetensors raises several types for a damaged file; all mean unreadable
        raise DataError(f"{path}: not a readable toy-mode file ({type(exc).__name__}); rerun make-toy-data") from None


def _weights(text: str) -> list[float]:
    """argparse type of --mode-weights: comma-separated numbers."""
    import argparse

    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 4,2,1,1; got {text!r}") from None


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """CLI: ds-distill make-toy-data OUT --model TINY_WAN [--overwrite]."""
    parser = ArgumentParser(prog="ds-distill make-toy-data", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output directory (refused when not empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing toy dataset (the new one is swapped in when complete)")
    parser.add_argument("--model", required=True, help="Wan directory whose text encoder and VAE stats to use")
    parser.add_argument("--rows-per-caption", type=int, default=ToyDataConfig.rows_per_caption)
    parser.add_argument("--modes", type=int, default=ToyDataConfig.modes, help="modes on each caption's ring")
    parser.add_argument("--mode-weights", type=_weights, default=None,
                        help="comma-separated relative weight per mode, e.g. 4,2,1,1 (default: equal)")
    parser.add_argument("--num-frames", type=int, default=ToyDataConfig.num_frames,
                        help="clip frames (latent size: 4k+1 frames with the tiny VAE)")
    parser.add_argument("--height", type=int, default=ToyDataConfig.height, help="clip height in pixels")
    parser.add_argument("--width", type=int, default=ToyDataConfig.width, help="clip width in pixels")
    parser.add_argument("--text-len", type=int, default=ToyDataConfig.text_len)
    parser.add_argument("--latent-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = ToyDataConfig(
        rows_per_caption=args.rows_per_caption,
        modes=args.modes,
        mode_weights=args.mode_weights,
        num_frames=args.num_frames,
        height=args.height,
        width=args.width,
        text_len=args.text_len,
        latent_dtype=args.latent_dtype,
        seed=args.seed,
    )
    out = make_toy_data(args.out, args.model, cfg, overwrite=args.overwrite)
    print(f"toy dataset written to {out} (latents/, text_only/, validation.json, {MODES_FILE})")
    return 0

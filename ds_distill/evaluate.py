"""`ds-distill eval-toy`: how close samples of a model are to the toy dataset's known distribution.

Prints one row per (model, sampler, steps): distance to the nearest mode in the caption's plane, mean radius,
mode coverage and balance, and the off-plane RMS (see `utils.toy_data.score_samples`). Models are Diffusers directories (e.g. an export) or a checkpoint
role folder (`checkpoint-N/student`, read with DeepSpeed's zero_to_fp32 and the config of --base).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ds_distill.cli import ArgumentParser, check_output_file, check_safetensors, loading, require_components
from ds_distill.errors import UserError, exit_on_user_error


@dataclass
class EvalSpec:
    """One row of the table: which model, which loop, how many steps, what guidance."""

    label: str
    model: str
    sampler: str
    steps: int | None = None
    raw_timesteps: list[float] | None = None
    guidance_scale: float = 1.0


def load_transformer(path: str | Path, base: str | Path | None = None, ema: bool = False):
    """A plain fp32 denoiser: the family's from a Diffusers dir (whatever parts it has), or a WanTransformer3DModel
    from a transformer folder or a ZeRO-3 checkpoint role folder."""
    from diffusers import WanTransformer3DModel

    from ds_distill.models.wan import WanFamily

    p = Path(path)
    if (p / "transformer" / "config.json").is_file():
        return WanFamily.load_plain_module(p, torch.float32).float().eval()
    if (p / "config.json").is_file() and any(p.glob("*.safetensors*")):
        return WanTransformer3DModel.from_pretrained(p).float().eval()
    if any(p.glob("*_model_states.pt")):
        if base is None:
            raise UserError(f"{p}: a checkpoint folder needs --base MODEL_DIR for the transformer config")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        config = WanTransformer3DModel.load_config(Path(base) / "transformer")
        model = WanTransformer3DModel.from_config(config).float()
        if ema:
            from ds_distill.methods.distribution_matching.ema import whole_tensors

            files = sorted((p / "ema").glob("rank-*.safetensors"))
            if not files:
                raise UserError(f"{p}: no EMA partitions (ema/rank-*.safetensors)")
            state = whole_tensors(files)
        else:
            state = get_fp32_state_dict_from_zero_checkpoint(str(p.parent), tag=p.name)
        model.load_state_dict(state)
        return model.eval()
    raise UserError(f"{p}: not a Diffusers model directory or a checkpoint role folder")


def toy_conditions(data_dir: Path, text_len: int) -> tuple[list[str], torch.Tensor]:
    """The caption of each mode group and its training text embedding [K, L, D] (padded like the loader)."""
    from ds_distill.utils.dataloader import ParquetDataset
    from ds_distill.utils.toy_data import load_toy_distribution

    captions = load_toy_distribution(data_dir).captions
    ds = ParquetDataset(data_dir / "text_only", text_len, need_latents=False)
    found = {}
    for i in range(len(ds)):
        row = ds[i]
        found.setdefault(row["caption"], row["text_embedding"])
        if len(found) == len(captions):
            break
    return captions, torch.stack([found[c] for c in captions])


def sample_model(model, spec: EvalSpec, conds: torch.Tensor, uncond: torch.Tensor, per_caption: int,
                 latent_shape, flow_shift: float, seed: int, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples [N, C, T, H, W] (normalised space) and their caption index [N]."""
    from ds_distill.samplers import denoiser_from_module, sample_latents

    denoise = denoiser_from_module(model, torch.float32)
    k = conds.shape[0]
    idx = torch.arange(k).repeat_interleave(per_caption)
    out = []
    g = torch.Generator().manual_seed(seed)
    for lo in range(0, len(idx), batch):
        ci = idx[lo : lo + batch]
        noise = torch.randn((len(ci), *latent_shape), generator=g)
        with torch.no_grad():
            out.append(sample_latents(
                spec.sampler, denoise, noise, conds[ci], flow_shift=flow_shift, generator=g,
                num_steps=spec.steps or 50, raw_timesteps=spec.raw_timesteps,
                guidance_scale=spec.guidance_scale, uncond=uncond.expand(len(ci), -1, -1),
            ))
    return torch.cat(out), idx


def evaluate(specs: list[EvalSpec], data_dir: str | Path, base: str | Path | None = None, per_caption: int = 32,
             flow_shift: float = 3.0, text_len: int = 16, seed: int = 1234, ema: bool = False,
             uncond: torch.Tensor | None = None) -> list[dict]:
    """Score every spec (plus the dataset itself) against the toy distribution."""
    from ds_distill.utils.dataloader import ParquetDataset
    from ds_distill.utils.toy_data import load_toy_distribution, score_samples

    data_dir = Path(data_dir)
    dist = load_toy_distribution(data_dir)
    captions, conds = toy_conditions(data_dir, text_len)
    if uncond is None:
        uncond = torch.zeros(1, *conds.shape[1:])
    rows = []
    # The data row: real latents, normalised with the model's VAE stats.
    ds = ParquetDataset(data_dir / "latents", text_len, need_latents=True)
    vae_cfg = json.loads((Path(base or specs[0].model) / "vae" / "config.json").read_text())
    c = len(vae_cfg["latents_mean"])
    mean = torch.tensor(vae_cfg["latents_mean"]).view(c, 1, 1, 1)
    std = torch.tensor(vae_cfg["latents_std"]).view(c, 1, 1, 1)
    lat, cap = [], []
    for i in range(len(ds)):
        r = ds[i]
        lat.append((r["vae_latent"] - mean) / std)
        cap.append(captions.index(r["caption"]))
    rows.append({"label": "data", **score_samples(torch.stack(lat), torch.tensor(cap), dist)})
    shape = tuple(dist.centers.shape[1:])
    models: dict[str, torch.nn.Module] = {}
    for spec in specs:
        if spec.model not in models:
            with loading("transformer", Path(spec.model), "--" + spec.label.split("@")[0]):
                models[spec.model] = load_transformer(spec.model, base, ema=ema)
        samples, idx = sample_model(models[spec.model], spec, conds, uncond, per_caption, shape, flow_shift, seed)
        rows.append({"label": spec.label, **score_samples(samples, idx, dist)})
    return rows


COLUMNS = ("mode_dist", "radius", "coverage", "balance", "off_plane")


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table (lower mode_dist is better; radius should match the data's)."""
    lines = [f"{'samples':<18}" + "".join(f"{c:>11}" for c in COLUMNS)]
    for r in rows:
        lines.append(f"{r['label']:<18}" + "".join(f"{r[c]:>11.3f}" for c in COLUMNS))
    return "\n".join(lines)


def check_model_arg(path: str, flag: str) -> None:
    """A Diffusers model folder or a checkpoint role folder, as load_transformer reads them."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{flag} {p}: folder does not exist")
    if not p.is_dir():
        raise UserError(f"{flag} {p}: is a file; expected a model folder or a checkpoint role folder")
    if (p / "transformer" / "config.json").is_file():
        check_safetensors(p / "transformer", flag)
    elif (p / "config.json").is_file():
        check_safetensors(p, flag)
    elif not any(p.glob("*_model_states.pt")):
        raise UserError(f"{flag} {p}: not a Diffusers model directory (transformer/config.json) or a checkpoint "
                        "role folder (*_model_states.pt)")


def parse_timesteps(text: str) -> list[float]:
    """`1000,750,500,250` -> raw timesteps, checked as the SDE sampler checks them."""
    from ds_distill.samplers import check_raw_timesteps

    try:
        return check_raw_timesteps([float(s) for s in text.split(",")])
    except ValueError as exc:
        raise UserError(f"--timesteps {text!r}: {exc} (expected comma-separated numbers, e.g. 1000,750,500,250)"
                        ) from None


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """CLI: ds-distill eval-toy --data TOY --teacher DIR --student DIR_OR_CKPT [--base DIR]."""
    p = ArgumentParser(prog="ds-distill eval-toy", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="toy dataset folder (make-toy-data output)")
    p.add_argument("--teacher", required=True, help="teacher model directory")
    p.add_argument("--student", help="student model directory or checkpoint role folder")
    p.add_argument("--base", help="Diffusers dir with vae/ and transformer/config.json (for checkpoints)")
    p.add_argument("--ema", action="store_true", help="read the student's EMA partitions from a checkpoint")
    p.add_argument("--timesteps", default="1000,750,500,250", help="the few-step raw timesteps")
    p.add_argument("--guidance", type=float, default=1.0, help="teacher CFG scale")
    p.add_argument("--per-caption", type=int, default=32)
    p.add_argument("--flow-shift", type=float, default=3.0)
    p.add_argument("--text-len", type=int, default=16)
    p.add_argument("--json", help="also write the rows here (an existing file only with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = p.parse_args(argv)
    steps = parse_timesteps(args.timesteps)
    for flag, value in (("--per-caption", args.per_caption), ("--text-len", args.text_len)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    if not 0 <= args.guidance < math.inf:
        raise UserError(f"--guidance {args.guidance}: must be a finite number >= 0 (1 disables guidance)")
    if not 0 < args.flow_shift < math.inf:
        raise UserError(f"--flow-shift {args.flow_shift}: must be a positive number")
    from ds_distill.utils.toy_data import load_toy_distribution

    for sub in ("latents", "text_only"):
        if not (Path(args.data) / sub).is_dir():
            raise UserError(f"--data {args.data}: no {sub}/ (expected a make-toy-data folder)")
    load_toy_distribution(args.data)
    check_model_arg(args.teacher, "--teacher")
    if args.student:
        check_model_arg(args.student, "--student")
    base = args.base or args.teacher
    require_components(Path(base), "--base" if args.base else "--teacher", ("vae",))
    if args.json:
        check_output_file(args.json, "--json", args.overwrite)
    n = len(steps)
    specs = [
        EvalSpec("teacher@50 ode", args.teacher, "ode", steps=50, guidance_scale=args.guidance),
        EvalSpec(f"teacher@{n} sde", args.teacher, "sde", raw_timesteps=steps, guidance_scale=args.guidance),
    ]
    if args.student:
        specs += [EvalSpec(f"student@{n} sde", args.student, "sde", raw_timesteps=steps),
                  EvalSpec("student@1 sde", args.student, "sde", raw_timesteps=steps[:1])]
    rows = evaluate(specs, args.data, base=base, per_caption=args.per_caption,
                    flow_shift=args.flow_shift, text_len=args.text_len, ema=args.ema)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0

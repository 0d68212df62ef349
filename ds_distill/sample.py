"""`ds-distill sample`: generate mp4 videos from any Diffusers-format Wan directory (an exported student,
a released Wan2.1 T2V model, the tiny Wan) with the ODE or SDE loop that validation uses.

Plain PyTorch in one process: no DeepSpeed process group. Examples:

    ds-distill sample --model outputs/student --output-dir out --sampler sde --timesteps 1000 750 500 250 \\
        --prompt "a cat walking on a sunny street"
    ds-distill sample --model Wan2.1-T2V-1.3B-Diffusers --output-dir out --steps 50 --guidance 5 \\
        --prompts-file prompts.json
    ds-distill sample --model Wan2.1-T2V-1.3B-Diffusers --lora lora_out/pytorch_lora_weights.safetensors \\
        --output-dir out --sampler sde --prompt "a cat walking on a sunny street"

`--lora` applies a LoRA file (ours from `convert --lora`, or any Diffusers-loadable Wan LoRA) to --model's
transformer with `WanPipeline.load_lora_weights`.

Videos are `<i>-<slug>.mp4` plus `manifest.json` in --output-dir. An --output-dir that already holds any of the
files a run would write (an earlier run's output) is refused unless `--overwrite`, which replaces them and removes
the videos the old manifest lists that the new run does not write again.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from ds_distill.cli import ArgumentParser, check_output_dir, check_safetensors, loading, read_json_object, require_components
from ds_distill.errors import UserError, exit_on_user_error

logger = logging.getLogger("ds_distill")

DEFAULT_SIZE = {"height": 480, "width": 832, "num_frames": 81}
DEFAULT_ODE_STEPS = 50
DEFAULT_SDE_TIMESTEPS = [1000.0, 750.0, 500.0, 250.0]
DEFAULT_GUIDANCE = {"ode": 5.0, "sde": 1.0}


def build_parser() -> argparse.ArgumentParser:
    from ds_distill.utils.config import WAN_NEGATIVE_PROMPT

    p = ArgumentParser(
        prog="ds-distill sample",
        description="Generate mp4 videos from a Diffusers-format Wan directory with the ODE or SDE sampler.",
    )
    p.add_argument("--model", required=True, help="Diffusers-format Wan directory (transformer/, vae/, ...)")
    p.add_argument("--lora", default=None, metavar="FILE",
                   help="a LoRA .safetensors file (or a folder holding pytorch_lora_weights.safetensors) applied to "
                        "--model's transformer with WanPipeline.load_lora_weights")
    p.add_argument("--output-dir", required=True, help="where <i>-<slug>.mp4 files are written")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a caption (repeat for several videos)")
    src.add_argument("--prompts-file", help='JSON {"data": [{"caption": ...}]} or parquet with text embeddings')
    p.add_argument("--sampler", choices=["ode", "sde"], default="ode",
                   help="ode: the flow-matching scheduler with CFG (default); sde: x0 prediction + re-noising")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, help=f"sampling steps (ode default: the prompts file's "
                       f"num_inference_steps, else {DEFAULT_ODE_STEPS}; sde: evenly spaced raw timesteps)")
    steps.add_argument("--timesteps", type=float, nargs="+",
                       help="explicit descending raw timesteps in (0, 1000], shifted by the flow shift "
                            f"(sde default: {' '.join(str(int(t)) for t in DEFAULT_SDE_TIMESTEPS)})")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale; 1 disables (default: 5 for ode, 1 for sde)")
    p.add_argument("--negative-prompt", default=WAN_NEGATIVE_PROMPT, help="unconditional prompt for guidance > 1")
    p.add_argument("--seed", type=int, default=0, help="video i is seeded with seed + i (default 0)")
    p.add_argument("--height", type=int, default=None, help=f"default: the prompts file, else {DEFAULT_SIZE['height']}")
    p.add_argument("--width", type=int, default=None, help=f"default: the prompts file, else {DEFAULT_SIZE['width']}")
    p.add_argument("--num-frames", type=int, default=None,
                   help=f"4k+1 frames (default: the prompts file, else {DEFAULT_SIZE['num_frames']})")
    p.add_argument("--flow-shift", type=float, default=None,
                   help="timestep shift (default: the model's scheduler config, else 3.0)")
    p.add_argument("--text-len", type=int, default=512, help="text tokens the condition is padded to (default 512)")
    p.add_argument("--fps", type=int, default=16, help="frame rate of the mp4 files (default 16)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="transformer dtype (default: bf16 on GPUs, fp32 on the CPU); latents stay fp32")
    p.add_argument("--components-from", default=None,
                   help="a Wan directory supplying vae/, text_encoder/, tokenizer/ that --model lacks")
    p.add_argument("--save-latents", action="store_true",
                   help="also write each video's final latents (model space) as <i>-<slug>.safetensors")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the videos and manifest.json of an earlier run in --output-dir")
    return p


def flow_shift_of(scheduler_config: dict) -> float:
    """The shift a model directory's scheduler was saved with (FlowMatchEuler: `shift`, UniPC: `flow_shift`)."""
    for key in ("shift", "flow_shift"):
        if isinstance(scheduler_config.get(key), (int, float)):
            return float(scheduler_config[key])
    return 3.0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: {name!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device: {name} asked for, but torch sees no CUDA device here")
    return device


def component_dir(name: str, model_dir: Path, fallback: Optional[Path], purpose: str) -> Path:
    """The directory holding `name/`: the model's own, else --components-from's."""
    for base in (model_dir, fallback):
        if base is not None and (base / name).is_dir():
            return base
    hint = "" if fallback else "; pass --components-from BASE_WAN_DIR"
    where = f"{model_dir} and {fallback}" if fallback else str(model_dir)
    raise UserError(f"--model: {where} has no {name}/ (needed {purpose}){hint}")


def check_rotary_range(prompts: list, vae_config: dict, transformer_config: dict, source: str) -> None:
    """Latent patches per axis must fit the transformer's rotary table (`rope_max_seq_len`)."""
    limit = int(transformer_config.get("rope_max_seq_len", 1024))
    pt, ph, pw = list(transformer_config.get("patch_size") or (1, 2, 2))
    temporal = int(vae_config.get("scale_factor_temporal", 4))
    spatial = int(vae_config.get("scale_factor_spatial", 8))
    for p in prompts:
        for key, n in (("num_frames", ((p.num_frames - 1) // temporal + 1) // pt),
                       ("height", p.height // spatial // ph), ("width", p.width // spatial // pw)):
            if n > limit:
                flag = "--" + key.replace("_", "-")
                raise UserError(f"{source}: {p.where}.{key}: {getattr(p, key)} gives {n} latent patches, more than "
                                f"the model's rotary range (rope_max_seq_len {limit}); use a smaller {flag}")


def read_configs(model_dir: Path, flag: str):
    """`read_components`, after checking that every config JSON it reads is a readable JSON object."""
    from ds_distill.models.components import read_components

    for rel in ("model_index.json", "config.json", "transformer/config.json", "vae/config.json",
                "scheduler/scheduler_config.json"):
        if (model_dir / rel).is_file():
            read_json_object(model_dir / rel, flag)
    return read_components(model_dir)


def check_numbers(args) -> None:
    """Counts at least 1; guidance, flow shift and seed in range and finite."""
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps: must be at least 1, got {args.steps}")
    for flag, value in (("--text-len", args.text_len), ("--height", args.height), ("--width", args.width),
                        ("--num-frames", args.num_frames), ("--fps", args.fps)):
        if value is not None and value < 1:
            raise UserError(f"{flag}: must be at least 1, got {value}")
    if args.guidance is not None and not 0 <= args.guidance < math.inf:
        raise UserError(f"--guidance: must be a finite number >= 0 (1 disables guidance), got {args.guidance}")
    if args.flow_shift is not None and not 0 < args.flow_shift < math.inf:
        raise UserError(f"--flow-shift: must be a positive number, got {args.flow_shift}")
    if not 0 <= args.seed < 2**62:
        raise UserError(f"--seed: must be between 0 and 2**62, got {args.seed}")


def output_names(prompts: list, save_latents: bool) -> list[str]:
    """The files a run writes into --output-dir, manifest last."""
    from ds_distill.validators.prompts import slugify

    names = []
    for i, p in enumerate(prompts):
        names.append(f"{i}-{slugify(p.caption)}.mp4")
        if save_latents:
            names.append(f"{i}-{slugify(p.caption)}.safetensors")
    return names + ["manifest.json"]


def check_output(out_dir: Path, names: list[str], overwrite: bool) -> list[str]:
    """Refuse to write over an earlier run's files unless --overwrite; returns the earlier run's stale files
    (listed in its manifest, not written again) for --overwrite to remove once the new ones are written."""
    check_output_dir(out_dir, "--output-dir", overwrite=True)  # a file, or a place we cannot write
    existing = [n for n in names if (out_dir / n).exists()]
    if existing and not overwrite:
        raise UserError(f"--output-dir {out_dir}: already holds {existing[0]} (an earlier run's output); pass "
                        "--overwrite to replace it, or pick a new folder")
    for n in existing:
        if (out_dir / n).is_dir():
            raise UserError(f"--output-dir {out_dir}: {n} is a folder; remove it or pick a new folder")
    stale = []
    if overwrite and (out_dir / "manifest.json").is_file():
        try:
            old = json.loads((out_dir / "manifest.json").read_text()).get("videos", [])
            listed = [v["file"] for v in old if isinstance(v, dict) and isinstance(v.get("file"), str)]
        except (OSError, ValueError, AttributeError):
            listed = []
        for name in listed:
            base = Path(name).name  # only files directly in --output-dir
            for candidate in (base, str(Path(base).with_suffix(".safetensors"))):
                if candidate not in names and (out_dir / candidate).is_file():
                    stale.append(candidate)
    return stale


def load_prompt_list(args) -> tuple[list, str]:
    from ds_distill.validators.prompts import ValidationPrompt, load_prompts

    if args.prompts_file:
        return load_prompts(args.prompts_file), args.prompts_file
    prompts = []
    for i, caption in enumerate(args.prompt):
        if not caption.strip():
            raise UserError(f"--prompt #{i + 1} is empty")
        prompts.append(ValidationPrompt(caption=caption, where=f"prompt {i}"))
    return prompts, "--prompt"


def lora_file(path: str) -> Path:
    """--lora: a safetensors file, or a folder holding diffusers' default LoRA file name; its header readable."""
    from ds_distill.export import LORA_WEIGHTS_NAME

    p = Path(path)
    if p.is_dir():
        p = p / LORA_WEIGHTS_NAME
        if not p.is_file():
            raise UserError(f"--lora: {path} is a folder without {LORA_WEIGHTS_NAME}; pass the LoRA file itself")
    elif not p.is_file():
        raise UserError(f"--lora: {path} does not exist")
    from safetensors import safe_open

    try:
        with safe_open(str(p), "pt") as handle:
            keys = list(handle.keys())
    except Exception as exc:  # SafetensorError, OSError: a damaged, partial or foreign file
        raise UserError(f"--lora: {p} is not a readable safetensors file ({' '.join(str(exc).split())})") from None
    if not any("lora" in k for k in keys):  # Wan LoRAs may also carry `.diff` / `.diff_b` tensors
        raise UserError(f"--lora: {p} holds no LoRA weights (no tensor name has `lora`)")
    return p


def apply_lora(transformer, path: Path) -> None:
    """Load a LoRA file onto the transformer as a Wan pipeline does (`WanPipeline.load_lora_weights`)."""
    from diffusers import WanPipeline

    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=None, scheduler=None)
    try:
        pipe.load_lora_weights(str(path))
    except (ValueError, KeyError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"--lora: {path} does not fit --model's transformer ({first})") from None


def resolve_schedule(args, prompt) -> tuple[int, Optional[list[float]]]:
    """(num_steps, raw_timesteps) for one prompt."""
    if args.timesteps is not None:
        return len(args.timesteps), list(args.timesteps)
    if args.sampler == "sde":
        if args.steps is not None:
            return args.steps, None
        return len(DEFAULT_SDE_TIMESTEPS), list(DEFAULT_SDE_TIMESTEPS)
    return args.steps or prompt.num_inference_steps or DEFAULT_ODE_STEPS, None


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from ds_distill.models.components import resolve_model_dir, transformer_dir
    from ds_distill.models.wan import WanFamily
    from ds_distill.models.wan_common import PromptEncoder, latent_shape_for, text_encoder_dtype
    from ds_distill.samplers import check_raw_timesteps, denoiser_from_module, initial_noise, sample_latents
    from ds_distill.validators.prompts import check_text_dim, pad_embedding
    from ds_distill.validators.wan import WanDecoder, check_video_sizes, frames_to_uint8, write_mp4

    # -- check everything the user typed before loading or writing anything ----------------------------
    check_numbers(args)
    if args.timesteps is not None:
        try:
            check_raw_timesteps(args.timesteps)
        except ValueError as exc:
            raise UserError(f"--timesteps: {exc}") from None
    guidance = args.guidance if args.guidance is not None else DEFAULT_GUIDANCE[args.sampler]
    model_dir = resolve_model_dir(args.model, "ds-distill sample", "--model")
    fallback = None
    if args.components_from:
        fallback = resolve_model_dir(args.components_from, "ds-distill sample", "--components-from")
    comps = read_configs(model_dir, "--model")
    check_safetensors(transformer_dir(model_dir), "--model")
    vae_base = component_dir("vae", model_dir, fallback, "to decode videos")
    vae_config = require_components(vae_base, "--model" if vae_base == model_dir else "--components-from",
                                    ("vae",))["vae"]
    scheduler_config = comps.scheduler_config or (read_configs(fallback, "--components-from").scheduler_config
                                                  if fallback else {})
    flow_shift = args.flow_shift if args.flow_shift is not None else flow_shift_of(scheduler_config)
    prompts, source = load_prompt_list(args)
    for p in prompts:
        for key, default in DEFAULT_SIZE.items():
            setattr(p, key, getattr(args, key) or getattr(p, key) or default)
    check_video_sizes(prompts, vae_config, comps.transformer_config.get("patch_size"), source)
    check_rotary_range(prompts, vae_config, comps.transformer_config, source)
    check_text_dim(prompts, comps.transformer_config.get("text_dim", 4096), source)
    todo = [p for p in prompts if p.embedding is None]
    text_base = None
    if todo or guidance > 1.0:
        text_base = component_dir("text_encoder", model_dir, fallback, "to encode prompts")
        require_components(text_base, "--model" if text_base == model_dir else "--components-from",
                           ("text_encoder", "tokenizer"))
    device = pick_device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    lora = lora_file(args.lora) if args.lora else None
    out_dir = Path(args.output_dir)
    names = output_names(prompts, args.save_latents)
    stale = check_output(out_dir, names, args.overwrite)

    # -- text: encode captions (and the negative prompt) once, then free the encoder ------------------
    started = time.perf_counter()
    uncond = None
    if text_base is not None:
        with loading("text encoder", text_base, "--model" if text_base == model_dir else "--components-from"):
            encoder = PromptEncoder(text_base, device=device, dtype=text_encoder_dtype(device))
        embeddings = encoder([p.caption for p in todo] + ([args.negative_prompt] if guidance > 1.0 else []),
                             args.text_len)
        for p, emb in zip(todo, embeddings):
            p.embedding = emb
        if guidance > 1.0:
            uncond = pad_embedding(embeddings[-1], args.text_len).unsqueeze(0).to(device)
        del encoder
        gc.collect()

    # -- transformer and sampling -------------------------------------------------------------------
    with loading("transformer", transformer_dir(model_dir), "--model"):
        transformer = WanFamily.load_plain_module(model_dir, dtype)  # the family's denoiser, whatever its parts
    if lora is not None:
        apply_lora(transformer, lora)
    transformer = transformer.to(device).eval()
    denoiser = denoiser_from_module(transformer, dtype, timestep_fn=WanFamily.timestep_fn(comps.model_index))
    results = []
    for i, p in enumerate(prompts):
        num_steps, raw_timesteps = resolve_schedule(args, p)
        shape = latent_shape_for(vae_config, p.num_frames, p.height, p.width)
        generator = torch.Generator("cpu").manual_seed(args.seed + i)
        noise = initial_noise((1, *shape), generator, device)
        cond = pad_embedding(p.embedding, args.text_len).unsqueeze(0).to(device)
        latents = sample_latents(
            args.sampler, denoiser, noise, cond, flow_shift=flow_shift, generator=generator,
            num_steps=num_steps, raw_timesteps=raw_timesteps, guidance_scale=guidance, uncond=uncond,
            scheduler_config=scheduler_config,
        )
        results.append((i, p, latents.cpu(), num_steps, raw_timesteps))
    del transformer
    gc.collect()

    # -- decode and write ---------------------------------------------------------------------------
    with loading("VAE", vae_base / "vae", "--model" if vae_base == model_dir else "--components-from"):
        decoder = WanDecoder(vae_base, device=device)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--output-dir: cannot create {out_dir} ({exc.strerror})") from None
    manifest = []
    for i, p, latents, num_steps, raw_timesteps in results:
        name = Path(names[i * (2 if args.save_latents else 1)]).stem
        frames = frames_to_uint8(decoder.decode(latents)[0])
        path = write_mp4(out_dir / f"{name}.mp4", frames, args.fps)
        if args.save_latents:
            from safetensors.torch import save_file

            save_file({"latents": latents.contiguous()}, str(out_dir / f"{name}.safetensors"))
        manifest.append({"file": path.name, "caption": p.caption, "seed": args.seed + i, "height": p.height,
                         "width": p.width, "num_frames": p.num_frames, "sampling_steps": num_steps,
                         "sampling_timesteps": raw_timesteps})
        print(f"wrote {path} ({frames.shape[0]} frames, {p.width}x{p.height})", flush=True)
    meta = {"model": str(model_dir), **({"lora": str(lora)} if lora is not None else {}), "sampler_kind": args.sampler, "guidance_scale": guidance,
            "flow_shift": flow_shift, "videos": manifest}
    (out_dir / "manifest.json").write_text(json.dumps(meta, indent=2))
    for name in stale:
        (out_dir / name).unlink(missing_ok=True)
    print(f"{len(results)} video{'s' if len(results) != 1 else ''} in {time.perf_counter() - started:.1f} s "
          f"({args.sampler}, guidance {guidance:g}, flow shift {flow_shift:g}) -> {out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

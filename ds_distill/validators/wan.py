"""Validation videos for Wan roles: sample the validated role with the requested loop, decode with the VAE,
write mp4 files and tracker videos. Method-agnostic: what to run comes from `method.validation_request()`.

Collectives: the role is called under no_grad, so ZeRO-3 gathers its weights on every forward -- every rank
must make the same number of calls. Prompts are split across ranks and each rank's list is padded to the
same length (the padding samples are thrown away); the call count per prompt depends only on the request.
Each rank decodes and writes the videos it sampled; rank 0 writes the manifest and, when a tracker (TensorBoard,
wandb) is on, logs the frames the other ranks send it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ds_distill.errors import DataError, RecipeError
from ds_distill.models.components import ModelComponents
from ds_distill.models.wan_common import PromptEncoderCache, latent_shape_for
from ds_distill.samplers import initial_noise, sample_latents
from ds_distill.validators.base import ValidationRequest
from ds_distill.validators.prompts import ValidationPrompt, check_text_dim, load_prompts, pad_embedding, slugify

logger = logging.getLogger("ds_distill")

WAN_FPS = 16


# ----------------------------------------------------------------------------------------------
# Decoding and writing (shared with `ds-distill sample`)


class WanDecoder:
    """The Wan VAE on one device: normalised latents -> video frames, exactly as WanPipeline decodes them."""

    def __init__(self, model_dir: str | Path, device: torch.device | str = "cpu", dtype=torch.float32):
        from diffusers import AutoencoderKLWan
        from diffusers.video_processor import VideoProcessor

        self.vae = AutoencoderKLWan.from_pretrained(str(Path(model_dir) / "vae"), torch_dtype=dtype).to(device)
        self.vae.eval()
        cfg = self.vae.config
        self.device, self.dtype = torch.device(device), dtype
        self.mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1)
        # WanPipeline divides by 1/std; doing the same keeps decoded frames bit-identical to it.
        self.inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1)
        self.processor = VideoProcessor(vae_scale_factor=cfg.scale_factor_spatial)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """[B, C, T, H, W] normalised latents -> float frames [B, T', H', W', 3] in [0, 1]."""
        z = latents.to(self.device, self.dtype)
        z = z / self.inv_std.to(z) + self.mean.to(z)
        video = self.vae.decode(z, return_dict=False)[0]
        return self.processor.postprocess_video(video, output_type="np")

    def close(self) -> None:
        """Free the VAE (host or accelerator memory)."""
        self.vae = None
        if self.device.type != "cpu":
            from deepspeed.accelerator import get_accelerator

            get_accelerator().empty_cache()


def frames_to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] -> uint8 (rounded)."""
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = WAN_FPS) -> Path:
    """Write uint8 frames [T, H, W, 3] as an H.264 mp4 (imageio's bundled ffmpeg)."""
    import imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(str(path), fps=fps, codec="libx264", quality=8, macro_block_size=16) as writer:
        for frame in frames:
            writer.append_data(frame)
    return path


def check_video_sizes(prompts: list[ValidationPrompt], vae_config: dict, patch_size, source: str | Path) -> None:
    """Heights/widths must fill whole latent patches and frame counts whole latent frames (Wan: 16 px, 4k+1)."""
    spatial = int(vae_config.get("scale_factor_spatial", 8))
    temporal = int(vae_config.get("scale_factor_temporal", 4))
    ph, pw = list(patch_size or (1, 2, 2))[1:3]
    for p in prompts:
        for key, multiple in (("height", spatial * ph), ("width", spatial * pw)):
            value = getattr(p, key)
            if value % multiple:
                raise DataError(f"{source}: {p.where}.{key}: {value} is not a multiple of {multiple}")
        if (p.num_frames - 1) % temporal:
            raise DataError(f"{source}: {p.where}.num_frames: {p.num_frames} is not {temporal}*k+1 "
                            f"(e.g. {(p.num_frames - 1) // temporal * temporal + 1})")


# ----------------------------------------------------------------------------------------------
# The validator


class WanValidator:
    """Renders the validation prompts with the method's requested sampler at a fixed seed.

    Prompts are read (all ranks) and captions encoded (rank 0, then broadcast) once at construction, with the
    family's text encoder (`prompt_source`, shared with start-up's negative prompt and released here). Every rank
    loads the VAE for a run, decodes its own videos and frees it. Videos land in
    `output_dir/validation/step-<N>/<i>-<slug>.mp4` (written by the rank that sampled them) and in the trackers
    under `validation/<i>-<slug>`. Prompt i is seeded with `validation_seed + i`, so a video does not depend on the
    number of ranks.
    """

    fps = WAN_FPS

    def __init__(self, comps: ModelComponents, recipe, strategy, tracker=None, prompt_source=None):
        t = recipe.training
        self.comps = comps
        self.strategy = strategy
        self.dist = strategy.dist
        self.tracker = tracker
        self.output_dir = Path(t.output_dir) / "validation"
        self.seed = int(t.validation_seed)
        self.text_len = int(t.text_len)
        self.flow_shift = float(recipe.pipeline_config.flow_shift)
        self.scheduler_config = dict(comps.scheduler_config)
        self.prompt_source = prompt_source if prompt_source is not None else PromptEncoderCache()
        if not (comps.path / "vae" / "config.json").is_file():
            raise RecipeError(f"{recipe.source}: training.log_validation: {comps.path} has no vae/ to decode "
                              "validation videos")

        from ds_distill.utils.config import resolve_path

        self.prompts_file = resolve_path(t.validation_dataset_file, recipe)
        prompts = load_prompts(self.prompts_file)
        for p in prompts:
            p.height = p.height or t.height
            p.width = p.width or t.width
            p.num_frames = p.num_frames or t.num_frames
        check_video_sizes(prompts, comps.vae_config, comps.transformer_config.get("patch_size"), self.prompts_file)
        text_dim = comps.transformer_config.get("text_dim", 4096)
        check_text_dim(prompts, text_dim, self.prompts_file)
        try:
            self.prompts = self.encode_captions(prompts)
        finally:
            self.prompt_source.release_prompt_encoder()
        # Ranks with fewer prompts pad with the cheapest one (its video is thrown away).
        self.pad_index = min(range(len(prompts)), key=lambda i: prompts[i].height * prompts[i].width
                             * prompts[i].num_frames)

    def encode_captions(self, prompts: list[ValidationPrompt]) -> list[ValidationPrompt]:
        """Fill missing embeddings with the family's text encoder, run once on rank 0 and broadcast."""
        todo = [i for i, p in enumerate(prompts) if p.embedding is None]
        if not todo:
            return prompts
        if not (self.comps.path / "text_encoder").is_dir():
            raise DataError(f"{self.prompts_file}: captions need a text encoder but {self.comps.path} has no "
                            "text_encoder/; use a parquet prompts file with text_embedding_* columns")
        embeddings = None
        if self.dist.is_main:
            try:
                encoder = self.prompt_source.prompt_encoder(self.comps, self.dist.device)
                embeddings = encoder([prompts[i].caption for i in todo], self.text_len)
            except Exception as exc:  # sent to every rank, so none waits in the broadcast below
                embeddings = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        embeddings = self.strategy.broadcast_object(embeddings) if self.dist.world_size > 1 else embeddings
        if isinstance(embeddings, str):
            raise DataError(f"{self.prompts_file}: encoding the captions with {self.comps.path / 'text_encoder'} "
                            f"failed ({embeddings})")
        for i, emb in zip(todo, embeddings):
            prompts[i].embedding = emb
        return prompts

    # -- who samples what -------------------------------------------------------------------------
    def assignment(self) -> list[Optional[int]]:
        """This rank's prompt indices (strided over ranks), padded with None to the same length on all ranks."""
        n, world, rank = len(self.prompts), self.dist.world_size, self.dist.rank
        mine: list[Optional[int]] = list(range(rank, n, world))
        per_rank = -(-n // world)
        return mine + [None] * (per_rank - len(mine))

    def sample_one(self, index: Optional[int], request: ValidationRequest, role, adapter) -> torch.Tensor:
        """Final latents [1, C, T, H, W] of prompt `index` (None: a padding sample, thrown away)."""
        if index is None:
            index = self.pad_index
        prompt = self.prompts[index]
        device = adapter.device
        shape = latent_shape_for(self.comps.vae_config, prompt.num_frames, prompt.height, prompt.width)
        generator = torch.Generator("cpu").manual_seed(self.seed + index)
        noise = initial_noise((1, *shape), generator, device)
        cond = pad_embedding(prompt.embedding, self.text_len).unsqueeze(0).to(device)
        uncond = None
        if request.guidance_scale > 1.0:
            uncond = pad_embedding(adapter.uncond_embedding, self.text_len).unsqueeze(0).to(device)

        def denoiser(x, t, c):
            return adapter.predict_noise(role, x, t, c)

        return sample_latents(
            request.sampler_kind, denoiser, noise, cond,
            flow_shift=self.flow_shift, generator=generator,
            num_steps=request.sampling_steps, raw_timesteps=request.sampling_timesteps,
            guidance_scale=request.guidance_scale, uncond=uncond, scheduler_config=self.scheduler_config,
        )

    # -- the run ----------------------------------------------------------------------------------
    def run(self, method, step: int) -> list[Path]:
        """Collective: every rank samples, decodes and writes its share; rank 0 writes the manifest and the
        tracker videos. Several step counts (`training.validation_sampling_steps: "4,8"`) validate at each, in
        `step-<N>/steps-<K>/` and under `validation/steps-<K>/`. Returns the files this rank wrote."""
        requests = method.validation_request().expand()
        if len(requests) == 1:
            return self.run_one(method, step, requests[0], self.output_dir / f"step-{step}", "validation")
        paths = []
        for request in requests:
            k = request.sampling_steps
            paths += self.run_one(method, step, request, self.output_dir / f"step-{step}" / f"steps-{k}",
                                  f"validation/steps-{k}")
        return paths

    def run_one(self, method, step: int, request: ValidationRequest, folder: Path, tag: str) -> list[Path]:
        """One validation pass with one sampling schedule (see `run`)."""
        started = time.perf_counter()
        role = method.validation_role()
        ema = getattr(method, "ema", None) if request.use_ema else None
        weights = ema.swapped_in() if ema is not None else contextlib.nullcontext()
        was_training = role.module.training
        role.module.eval()
        mine: dict[int, torch.Tensor] = {}
        try:
            with weights, torch.no_grad():
                for index in self.assignment():
                    latents = self.sample_one(index, request, role, method.adapter)
                    if index is not None:
                        mine[index] = latents
        finally:
            role.module.train(was_training)
        # Rank 0 alone knows whether a tracker is on (the other ranks' trackers are off).
        to_tracker = self.tracker is not None and self.tracker.enabled
        if self.dist.world_size > 1:
            to_tracker = self.strategy.broadcast_object(to_tracker)
        error = None
        try:
            paths, entries = self.decode_and_write(mine, folder, to_tracker)
            logger.info("validation at step %d: rank %d decoded prompt(s) %s", step, self.dist.rank, sorted(mine))
        except Exception as exc:  # reported to every rank below, so none waits in a collective
            logger.exception("validation at step %d: decoding failed on rank %d", step, self.dist.rank)
            paths, entries = [], []
            error = f"rank {self.dist.rank}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        parts = self.strategy.gather_object((entries, error), dst=0)
        if self.dist.world_size > 1:
            error = self.strategy.broadcast_object(
                next((e for _, e in parts if e), None) if self.dist.is_main else None)
        if error:
            raise RuntimeError(f"validation at step {step}: decoding videos failed on {error}")
        if self.dist.is_main:
            entries = sorted((e for part, _ in parts for e in part), key=lambda e: e["index"])
            self.write_manifest(folder, entries, step, request, ema is not None, tag)
            logger.info("validation at step %d: %d videos (%s, %s%s) on %d rank(s) in %.1f s -> %s", step,
                        len(entries), request.sampler_kind, describe_schedule(request),
                        ", EMA weights" if ema is not None else "", self.dist.world_size,
                        time.perf_counter() - started, folder)
        return paths

    def decode_and_write(self, latents: dict[int, torch.Tensor], folder: Path, to_tracker: bool):
        """Load the VAE on this rank's device, decode and write this rank's videos, free the VAE.
        Returns the written paths and one manifest entry per video (with its frames when rank 0 logs them)."""
        folder.mkdir(parents=True, exist_ok=True)
        paths, entries = [], []
        decoder = WanDecoder(self.comps.path, device=self.dist.device) if latents else None
        try:
            for index in sorted(latents):
                prompt = self.prompts[index]
                name = f"{index}-{slugify(prompt.caption)}"
                frames = frames_to_uint8(decoder.decode(latents[index])[0])
                paths.append(write_mp4(folder / f"{name}.mp4", frames, self.fps))
                entries.append({"index": index, "file": f"{name}.mp4", "caption": prompt.caption,
                                "seed": self.seed + index, "height": prompt.height, "width": prompt.width,
                                "num_frames": prompt.num_frames, "rank": self.dist.rank,
                                "frames": frames if to_tracker else None})
        finally:
            if decoder is not None:
                decoder.close()
        return paths, entries

    def write_manifest(self, folder: Path, entries: list[dict], step: int, request: ValidationRequest,
                       ema: bool, tag: str = "validation") -> None:
        """Rank 0: tracker videos and a manifest of what was sampled (and which rank decoded it)."""
        for e in entries:
            frames = e.pop("frames")
            if frames is not None and self.tracker is not None:
                mp4 = folder / e["file"]  # written by another rank: here too when the file system is shared
                self.tracker.log_video(f"{tag}/{Path(e['file']).stem}", frames, step, fps=self.fps,
                                       path=mp4 if mp4.is_file() else None)
        steps = len(request.sampling_timesteps) if request.sampling_timesteps is not None else request.sampling_steps
        meta = {"step": step, "sampler_kind": request.sampler_kind, "sampling_steps": steps,
                "sampling_timesteps": request.sampling_timesteps, "guidance_scale": request.guidance_scale,
                "flow_shift": self.flow_shift, "ema": ema,
                "videos": [{k: v for k, v in e.items() if k != "index"} for e in entries]}
        (folder / "manifest.json").write_text(json.dumps(meta, indent=2))
        if self.tracker is not None:
            self.tracker.flush()


def describe_schedule(request: ValidationRequest) -> str:
    """`timesteps [1000, 750, 500, 250]` or `20 steps, guidance 5.0` for logs and manifests."""
    what = (f"timesteps {list(request.sampling_timesteps)}" if request.sampling_timesteps is not None
            else f"{request.sampling_steps} steps")
    return f"{what}, guidance {request.guidance_scale:g}"

"""DMD2 few-step distillation: a trainable student, a frozen teacher (real score) and a trainable critic
(fake score). The student learns to make samples whose teacher and critic x0 predictions agree.

Every choice that changes which modules run (exit index, whether the student updates, the CFG branch) comes
from the step index or a generator seeded identically on all ranks, so ZeRO-3's collectives line up; only the
per-sample noise differs between ranks (it is keyed by global sample id).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from ds_distill.adapters.base import TrainingBatch
from ds_distill.dispatch import register_method
from ds_distill.engines import OptimizerSpec
from ds_distill.errors import RecipeError
from ds_distill.methods.base import DistillMethod, default_optimizer_spec
from ds_distill.methods.distribution_matching.ema import PartitionedEMA
from ds_distill.utils import rng
from ds_distill.validators.base import ValidationRequest

logger = logging.getLogger("ds_distill")

DEFAULT_STEPS = [1000, 750, 500, 250]


@dataclass
class DMD2Config:
    """Knobs of `dmd2` (a knob left unset falls back to its deprecated `training.*` twin, then the default)."""

    rollout_mode: Optional[Literal["simulate", "data"]] = None
    """simulate: start from pure noise and run the student's few steps; data: noise dataset latents. Default simulate."""
    dmd_denoising_steps: Optional[list[int]] = None
    """The student's timesteps in (0, 1000], descending (see `warp_denoising_step`). Default [1000, 750, 500, 250].
    A trailing 0 (FastVideo's end-of-schedule mark, e.g. [999, 750, 500, 250, 0]) is dropped."""
    warp_denoising_step: bool = True
    """True: `dmd_denoising_steps` are raw steps, warped by flow_shift (S*u / (1 + (S-1)*u)) before use. False: they
    are used exactly as given, as already-shifted timesteps (FastVideo's convention for its Wan 8-step list)."""
    generator_update_interval: Optional[int] = None
    """The student steps when step % interval == 0; the critic steps every iteration. Default 5."""
    real_score_guidance_scale: Optional[float] = None
    """w in real = real_c + w (real_c - real_u); 0 skips the unconditional teacher pass. Default 3.5."""
    min_timestep_ratio: float = 0.02
    """Lower clamp of the score timestep, as a fraction of 1000 (after the shift)."""
    max_timestep_ratio: float = 0.98
    """Upper clamp of the score timestep."""
    critic_learning_rate: Optional[float] = None
    """Critic learning rate (default: training.learning_rate)."""
    critic_betas: Optional[list[float]] = None
    """Critic AdamW betas (default: training.betas)."""
    critic_weight_decay: Optional[float] = None
    """Critic weight decay (default: training.weight_decay)."""
    ema_decay: float = 0.0
    """EMA of the student's weights (0 disables); used for validation and export when on."""
    ema_start_step: int = 0
    """The EMA copies the weights until this step, then averages."""
    legacy_sources: list[str] = field(default_factory=list, init=False, repr=False)


def resolve_knobs(cfg: DMD2Config, training, source: str) -> DMD2Config:
    """method_config wins, then the deprecated training.* location, then the default."""
    legacy = {
        "dmd_denoising_steps": training.dmd_denoising_steps,
        "generator_update_interval": training.generator_update_interval,
        "real_score_guidance_scale": training.real_score_guidance_scale,
    }
    defaults = {"dmd_denoising_steps": list(DEFAULT_STEPS), "generator_update_interval": 5,
                "real_score_guidance_scale": 3.5}
    for key, old in legacy.items():
        if getattr(cfg, key) is None:
            if old is not None:
                cfg.legacy_sources.append(f"training.{key}")
            setattr(cfg, key, old if old is not None else defaults[key])
    if cfg.rollout_mode is None:
        if training.simulate_generator_forward is not None:
            cfg.legacy_sources.append("training.simulate_generator_forward")
            cfg.rollout_mode = "simulate" if training.simulate_generator_forward else "data"
        else:
            cfg.rollout_mode = "simulate"
    return cfg


@register_method("dmd2")
class DMD2Method(DistillMethod):
    """Distribution matching distillation (DMD2) with a critic trained by flow matching on student samples."""

    roles = {"student": True, "teacher": False, "critic": True}
    config_class = DMD2Config

    @classmethod
    def check_config(cls, config: DMD2Config, training, source: str) -> None:
        resolve_knobs(config, training, source)
        steps = config.dmd_denoising_steps
        if steps and len(steps) > 1 and steps[-1] == 0:  # FastVideo ends its lists with 0: the end, not a step
            steps = config.dmd_denoising_steps = list(steps[:-1])
        if not steps or any(not 0 < s <= 1000 for s in steps) or steps != sorted(steps, reverse=True):
            raise RecipeError(f"{source}: method_config.dmd_denoising_steps: expected descending raw timesteps "
                              f"in (0, 1000], e.g. [1000, 750, 500, 250] (a trailing 0 is allowed: it marks the end); "
                              f"got {steps}")
        if config.generator_update_interval < 1:
            raise RecipeError(f"{source}: method_config.generator_update_interval: must be at least 1")
        if not 0 <= config.min_timestep_ratio < config.max_timestep_ratio <= 1:
            raise RecipeError(f"{source}: method_config.min_timestep_ratio/max_timestep_ratio: need "
                              f"0 <= min < max <= 1")
        if not 0 <= config.ema_decay < 1:
            raise RecipeError(f"{source}: method_config.ema_decay: must be in [0, 1)")
        if training.gradient_accumulation_steps != 1:
            raise RecipeError(f"{source}: training.gradient_accumulation_steps: dmd2 takes one micro-batch per "
                              f"iteration; raise training.train_batch_size instead")
        if config.critic_betas is not None and len(config.critic_betas) != 2:
            raise RecipeError(f"{source}: method_config.critic_betas: expected two numbers")

    @classmethod
    def needs_latents(cls, config: DMD2Config) -> bool:
        return config.rollout_mode == "data"

    @classmethod
    def optimizer_spec(cls, role: str, config: DMD2Config, training) -> OptimizerSpec:
        spec = default_optimizer_spec(training, training.max_train_steps)
        if role == "critic":
            if config.critic_learning_rate is not None:
                spec.lr = config.critic_learning_rate
            if config.critic_betas is not None:
                spec.betas = tuple(config.critic_betas)
            if config.critic_weight_decay is not None:
                spec.weight_decay = config.critic_weight_decay
        else:
            # The student steps once per `generator_update_interval` iterations: its schedule counts its steps.
            spec.total_steps = max(1, training.max_train_steps // config.generator_update_interval)
        return spec

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.config
        for src in cfg.legacy_sources:
            logger.warning("%s is deprecated; move it to method_config (method_config wins when both are set)", src)
        self.student, self.teacher, self.critic = self.bundle["student"], self.bundle["teacher"], self.bundle["critic"]
        steps = torch.tensor(cfg.dmd_denoising_steps, dtype=torch.float32)
        self.step_timesteps = self.adapter.shift_timesteps(steps) if cfg.warp_denoising_step else steps
        self.ema = PartitionedEMA(self.student.module, cfg.ema_decay, self.strategy) if cfg.ema_decay > 0 else None

    # -- pieces ---------------------------------------------------------------------------------
    def score_timesteps(self, b: TrainingBatch, stream: str) -> torch.Tensor:
        """t' per sample: uniform raw in [0, 1000), shifted, clamped to [min, max] * 1000."""
        u = rng.per_sample_rand(b.sample_ids, self.seed, stream)
        t = self.adapter.shift_timesteps(u * 1000.0)
        return t.clamp(self.config.min_timestep_ratio * 1000.0, self.config.max_timestep_ratio * 1000.0)

    def student_sample(self, b: TrainingBatch, step: int, with_grad: bool, stream: str) -> torch.Tensor:
        """x0 from the student's few-step schedule, stopping at a shared exit index k (graph only at step k)."""
        a, steps = self.adapter, self.step_timesteps
        k = rng.shared_randint(len(steps), self.seed, stream, step)
        ts = [steps[i].expand(b.batch_size) for i in range(len(steps))]
        dev = a.device
        if self.config.rollout_mode == "data":
            eps = rng.per_sample_randn(b.latent_shape, b.sample_ids, self.seed, stream, extra=0, device=dev)
            x = a.add_noise(b.latents, eps, ts[k])
        else:
            x = rng.per_sample_randn(b.latent_shape, b.sample_ids, self.seed, stream, extra=0, device=dev)
            with torch.no_grad():
                for i in range(k):
                    v = a.predict_noise(self.student, x, ts[i], b.cond)
                    eps = rng.per_sample_randn(b.latent_shape, b.sample_ids, self.seed, stream, extra=i + 1, device=dev)
                    _, x = a.sde_step(x, v, ts[i], ts[i + 1], eps)
        with torch.set_grad_enabled(with_grad):
            v = a.predict_noise(self.student, x, ts[k], b.cond)
            x0, _ = a.sde_step(x, v, ts[k], None, None)
        return x0

    @torch.no_grad()
    def dmd_target(self, x0_gen: torch.Tensor, b: TrainingBatch) -> torch.Tensor:
        """stopgrad(x0_gen - g) with g = (fake - real) / mean|x0_gen - real| per sample."""
        a, w = self.adapter, self.config.real_score_guidance_scale
        x0 = x0_gen.detach()
        t = self.score_timesteps(b, "score_timestep")
        eps = rng.per_sample_randn(b.latent_shape, b.sample_ids, self.seed, "score_noise", device=x0.device)
        x_t = a.add_noise(x0, eps, t)
        fake = a.predict_x0(self.critic, x_t, t, b.cond)
        real = a.predict_x0(self.teacher, x_t, t, b.cond)
        if w != 0:
            real_u = a.predict_x0(self.teacher, x_t, t, b.uncond)
            real = real + w * (real - real_u)
        norm = (x0 - real).abs().mean(dim=tuple(range(1, x0.dim())), keepdim=True)
        grad = torch.nan_to_num((fake - real) / norm)
        return x0 - grad

    def generator_loss(self, b: TrainingBatch, step: int) -> torch.Tensor:
        x0_gen = self.student_sample(b, step, with_grad=True, stream="rollout_noise")
        target = self.dmd_target(x0_gen, b)
        return 0.5 * self.mse(x0_gen, target)

    def critic_loss(self, b: TrainingBatch, step: int) -> torch.Tensor:
        a = self.adapter
        x0 = self.student_sample(b, step, with_grad=False, stream="critic_rollout").detach()
        t = self.score_timesteps(b, "critic_timestep")
        eps = rng.per_sample_randn(b.latent_shape, b.sample_ids, self.seed, "critic_noise", device=x0.device)
        x_t = a.add_noise(x0, eps, t)
        v = a.predict_noise(self.critic, x_t, t, b.cond)
        return self.mse(v, eps - x0)

    def updates_student(self, step: int) -> bool:
        """Same answer on every rank: a function of the step only."""
        return step % self.config.generator_update_interval == 0

    # -- the iteration --------------------------------------------------------------------------
    def train_one_step(self, micro_batches: list[dict], step: int) -> dict[str, float]:
        (raw,) = micro_batches
        source = "data" if self.config.rollout_mode == "data" else "zeros"
        b = self.adapter.prepare_batch(raw, latents_source=source)
        out = {}
        if self.updates_student(step):
            loss = self.generator_loss(b, step)
            if self.update(self.student, loss, step) and self.ema is not None:
                self.ema.update(step, self.config.ema_start_step)
            out["student/loss"] = float(loss.detach())
        loss = self.critic_loss(b, step)
        self.update(self.critic, loss, step)
        out["critic/loss"] = float(loss.detach())
        return out

    def raw_denoising_steps(self) -> list[float]:
        """The student's schedule as raw timesteps (what samplers shift by flow_shift): the list itself when it is
        warped, else the raw timesteps whose shift gives the list back (u = s / (S - (S - 1) s), s = t / 1000)."""
        steps = [float(t) for t in self.config.dmd_denoising_steps]
        if self.config.warp_denoising_step:
            return steps
        shift = float(self.pipeline_config.flow_shift)
        return [1000.0 * (t / 1000.0) / (shift - (shift - 1.0) * t / 1000.0) for t in steps]

    def validation_request(self) -> ValidationRequest:
        return ValidationRequest(sampler_kind="sde", sampling_timesteps=self.raw_denoising_steps(),
                                 guidance_scale=1.0, use_ema=self.ema is not None)

    # -- state ----------------------------------------------------------------------------------
    def extra_checkpoint_files(self, role_dir_of) -> None:
        if self.ema is not None:
            self.ema.save(role_dir_of("student"))

    def load_extra_checkpoint_files(self, role_dir_of) -> None:
        if self.ema is not None:
            self.ema.load(role_dir_of("student"))

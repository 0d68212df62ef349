"""Finetuning (student only): flow-matching MSE on dataset latents."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ds_distill.dispatch import register_method
from ds_distill.errors import RecipeError
from ds_distill.methods.base import DistillMethod
from ds_distill.utils import rng
from ds_distill.validators.base import ValidationRequest


@dataclass
class FinetuneConfig:
    """Knobs of `finetune`."""

    weighting_scheme: Literal["uniform", "logit_normal", "mode"] = "uniform"
    """How u in [0, 1) is drawn before the timestep shift."""
    logit_mean: float = 0.0
    """Mean of the logit-normal scheme."""
    logit_std: float = 1.0
    """Std of the logit-normal scheme."""
    mode_scale: float = 1.29
    """Scale of the `mode` scheme."""
    precondition_outputs: bool = False
    """Regress x0 (x_t - sigma v) on the data instead of v on eps - x0."""
    training_cfg_rate: float = 0.0
    """Probability of dropping a sample's text condition: it becomes all zeros (the null condition; not the
    negative prompt, which would teach the model that the negative prompt means "no prompt")."""


def sample_u(cfg: FinetuneConfig, sample_ids: torch.Tensor, seed: int) -> torch.Tensor:
    """u in [0, 1) per sample by the weighting scheme (a function of seed and sample id only)."""
    if cfg.weighting_scheme == "logit_normal":
        z = rng.per_sample_normal(sample_ids, seed, "timestep")
        return torch.sigmoid(cfg.logit_mean + cfg.logit_std * z)
    u = rng.per_sample_rand(sample_ids, seed, "timestep")
    if cfg.weighting_scheme == "mode":
        u = 1 - u - cfg.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def raw_timesteps_from_u(u: torch.Tensor) -> torch.Tensor:
    """Index floor(u*1000) into the descending schedule 1000..1: raw timestep 1000 - floor(u*1000)."""
    return 1000.0 - torch.floor(u.clamp(0, 1 - 1e-7) * 1000.0)


@register_method("finetune")
class FinetuneMethod(DistillMethod):
    """Supervised flow-matching finetuning of the student on dataset latents."""

    roles = {"student": True}
    config_class = FinetuneConfig

    @classmethod
    def check_config(cls, config: FinetuneConfig, training, source: str) -> None:
        if not 0.0 <= config.training_cfg_rate <= 1.0:
            raise RecipeError(f"{source}: method_config.training_cfg_rate: must be in [0, 1]")
        if config.logit_std <= 0:
            raise RecipeError(f"{source}: method_config.logit_std: must be positive")

    def loss(self, raw: dict) -> torch.Tensor:
        """The flow-matching loss of one micro-batch (forward through the student's engine)."""
        a, cfg = self.adapter, self.config
        b = a.prepare_batch(raw, latents_source="data")
        x0 = b.latents
        t = a.shift_timesteps(raw_timesteps_from_u(sample_u(cfg, b.sample_ids, self.seed)))
        eps = rng.per_sample_randn(b.latent_shape, b.sample_ids, self.seed, "noise", device=x0.device)
        x_t = a.add_noise(x0, eps, t)
        cond = b.cond
        if cfg.training_cfg_rate > 0:
            drop = rng.per_sample_rand(b.sample_ids, self.seed, "cfg_drop") < cfg.training_cfg_rate
            cond = torch.where(drop.to(cond.device).view(-1, 1, 1), torch.zeros_like(cond), cond)
        v = a.predict_noise(self.bundle["student"], x_t, t, cond)
        if cfg.precondition_outputs:
            sigma = a.sigma(t).to(v.device).view(-1, *([1] * (v.dim() - 1)))
            return self.mse(x_t.float() - sigma * v, x0)
        return self.mse(v, eps - x0)

    def train_one_step(self, micro_batches: list[dict], step: int) -> dict[str, float]:
        student = self.bundle["student"]
        losses = []
        for i, raw in enumerate(micro_batches):
            loss = self.loss(raw)
            losses.append(loss.detach())
            if not self.update(student, loss, step, micro=i, last=i == len(micro_batches) - 1):
                break  # the whole step is skipped: the rest of its micro-batches would be thrown away
        return {"student/loss": float(torch.stack(losses).mean())}

    def validation_request(self) -> ValidationRequest:
        return ValidationRequest(
            sampler_kind=self.pipeline_config.sampler_kind,
            sampling_steps=self.training.validation_sampling_steps,
            guidance_scale=self.training.validation_guidance_scale,
        )

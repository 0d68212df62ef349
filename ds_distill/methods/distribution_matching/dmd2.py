"""DMD2 few-step distillation: a trainable student, a frozen teacher (real score) and a trainable critic
(fake score). The student learns to make samples whose teacher and critic x0 predictions agree.

With `gan_loss_weight_gen > 0` the diffusion-GAN term of DMD2 joins in (see `gan.py`): a head on the critic's
block features tells noised real latents from noised student samples; the critic's engine trains it, and the
student gets `gan_loss_weight_gen * softplus(-D(fake))` through the frozen critic and head.

Every choice that changes which modules run (exit index, whether the student updates, the CFG branch) comes
from the step index or a generator seeded identically on all ranks, so ZeRO-3's collectives line up; only the
per-sample noise differs between ranks (it is keyed by global sample id).
"""
from __future__ import annotations

import contextlib
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
from ds_distill.methods.distribution_matching.gan import GAN_HEAD, GanHead, critic_gan_loss, generator_gan_loss
from ds_distill.utils import rng
from ds_distill.validators.base import ValidationRequest

logger = logging.getLogger("ds_distill")

DEFAULT_STEPS = [1000, 750, 500, 250]
# The GAN term's randomness: rng streams no DMD2 draw uses (finetuning's), told apart by `extra`.
GAN_STREAMS = {"gan_timestep": ("timestep", 1001), "critic_gan_timestep": ("timestep", 1002),
               "gan_noise": ("noise", 1010), "critic_gan_noise": ("noise", 1020)}


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
    phased_scores: bool = False
    """Score each step's output only where the next step uses it: the x0 the student makes at step k (not the last)
    is re-noised to step k+1's timestep before anything reads it, so its DMD scores and the critic's flow-matching
    targets are drawn only at timesteps at or above step k+1's (the distribution of the re-noised sample is all that
    has to match); the last step's keep [min, max]. Early steps then see only smooth high-noise scores, which move
    mass between modes, not the sharp low-noise ones that pull samples into the nearest mode (after the
    subinterval score matching of Phased DMD, Fan et al. 2025). False: every step over [min, max], as before."""
    critic_rollout: Literal["random_exit", "final"] = "random_exit"
    """Which student samples the critic learns. `random_exit`: the x0 of a rollout stopped at a random step, like the
    student's own updates, so the critic's fake score is that of a mix of every step's outputs. `final`: always the
    x0 of the whole few-step rollout (the samples the student is used for; for a student that trains part of the
    timestep range, e.g. one expert, its last step in that range), over the whole [min, max] range. With
    `phased_scores` the early steps' blurred outputs otherwise sit in the critic's high-noise rows, its fake score
    there leans toward their mean, and the last step, compared with it, is pushed past the data (the toy ring's
    radius overshoots); `final` keeps that row set to what the sampler returns. The student's exits stay random."""
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
    gan_loss_weight_gen: float = 0.0
    """Weight of the student's GAN loss softplus(-D(fake)); 0 turns the GAN term off (plain DMD2, bit for bit)."""
    gan_loss_weight_critic: float = 0.01
    """Weight of the critic's GAN loss softplus(D(fake)) + softplus(-D(real)) (used when the GAN term is on)."""
    gan_feature_blocks: Optional[list[int]] = None
    """Critic blocks whose output hidden states feed the head (negative counts from the end). Default: the last."""
    gan_head: Literal["mean", "attention"] = "mean"
    """Head over each tapped block's tokens: `mean` (LayerNorm + mean over tokens) or `attention` (one learned query
    per block); the pooled vectors go through an MLP to one logit."""
    gan_head_hidden: int = 256
    """Width of the head's MLP."""
    gan_timestep: Literal["shifted", "uniform"] = "shifted"
    """How the GAN's noising timestep t (the same for a real latent and a student sample) is drawn: `shifted`
    uniform raw then flow-shifted, like the score timestep; `uniform` uniform in sigma. Clamped to
    [min_timestep_ratio, gan_max_timestep_ratio] * 1000."""
    gan_max_timestep_ratio: Optional[float] = None
    """Upper bound of the GAN's noising timestep, a fraction of 1000 (default: max_timestep_ratio). The head can
    only tell data from samples where the noise leaves their difference visible; a low cap keeps it there."""
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
        if not 0 <= config.gan_loss_weight_gen < float("inf"):
            raise RecipeError(f"{source}: method_config.gan_loss_weight_gen: must be a finite number >= 0 (0: off)")
        if config.gan_loss_weight_gen > 0:
            if not 0 < config.gan_loss_weight_critic < float("inf"):
                raise RecipeError(f"{source}: method_config.gan_loss_weight_critic: must be positive when "
                                  f"gan_loss_weight_gen is on (the critic trains the head)")
            blocks = config.gan_feature_blocks
            if blocks is not None and (not blocks or len(set(blocks)) != len(blocks)):
                raise RecipeError(f"{source}: method_config.gan_feature_blocks: expected a non-empty list of distinct "
                                  f"block indices, e.g. [15, 22, 29]; got {blocks}")
            hi = config.gan_max_timestep_ratio
            if hi is not None and not config.min_timestep_ratio < hi <= 1:
                raise RecipeError(f"{source}: method_config.gan_max_timestep_ratio: must be in "
                                  f"(min_timestep_ratio={config.min_timestep_ratio:g}, 1], got {hi:g}")
            if config.gan_head_hidden < 1:
                raise RecipeError(f"{source}: method_config.gan_head_hidden: must be at least 1")

    @staticmethod
    def gan_on(config: DMD2Config) -> bool:
        return config.gan_loss_weight_gen > 0

    @classmethod
    def needs_latents(cls, config: DMD2Config) -> bool:
        return config.rollout_mode == "data" or cls.gan_on(config)

    @classmethod
    def latents_needed_by(cls, config: DMD2Config) -> Optional[str]:
        """The knob that makes real latents necessary, for the data check's message (None: none does)."""
        if cls.gan_on(config):
            return "method_config.gan_loss_weight_gen (the GAN's real latents)"
        return "method_config.rollout_mode: data" if config.rollout_mode == "data" else None

    @classmethod
    def zero3_leaf_modules_ok(cls, role: str, config: DMD2Config) -> bool:
        """Whether the role's blocks may be ZeRO-3 leaf modules. Not the critic's with the GAN on: a leaf module
        reduces its gradients in a module backward hook, which also fires when the student's GAN loss flows through
        the frozen critic and would queue critic gradients twice; per-parameter hooks skip frozen parameters."""
        return not (role == "critic" and cls.gan_on(config))

    @classmethod
    def check_role_depths(cls, config: DMD2Config, depth_of, source: str) -> None:
        """gan_feature_blocks against the critic's depth, before anything is written (the same check runs again when
        the head is attached)."""
        n = depth_of("critic") if cls.gan_on(config) else None
        if n is not None:
            cls.resolve_blocks(config.gan_feature_blocks, n, source)

    @staticmethod
    def resolve_blocks(blocks: Optional[list[int]], n: int, source: str) -> list[int]:
        """Block indices (negative from the end; None: the last) checked against a depth of n, as 0..n-1."""
        blocks = blocks if blocks is not None else [-1]
        bad = [i for i in blocks if not -n <= i < n]
        if bad:
            raise RecipeError(f"{source}: method_config.gan_feature_blocks: block {bad[0]} does not exist (the critic "
                              f"has {n} blocks: 0..{n - 1}, or -1..-{n} from the end)")
        resolved = [i % n for i in blocks]
        if len(set(resolved)) != len(resolved):
            raise RecipeError(f"{source}: method_config.gan_feature_blocks: {blocks} names a block twice")
        return resolved

    @classmethod
    def extend_role(cls, role: str, config: DMD2Config, module: torch.nn.Module, adapter, source: str) -> None:
        """Before the role's engine is built: the critic gets the GAN head as a submodule, so its engine owns it.
        Resolves `gan_feature_blocks` against the critic's depth."""
        if role != "critic" or not cls.gan_on(config):
            return
        resolved = cls.resolve_blocks(config.gan_feature_blocks, adapter.num_blocks(module), source)
        config.gan_feature_blocks = resolved
        module.add_module(GAN_HEAD, GanHead(adapter.feature_dim(module), len(resolved), config.gan_head,
                                            config.gan_head_hidden))

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
        # A student module that trains only part of the timestep range (its `trained_timesteps`, e.g. one expert of
        # several) exits only at its own steps and is scored only within that range.
        self.expert_range = getattr(self.student.module, "trained_timesteps", None)
        self.exit_steps = list(range(len(steps)))
        if self.expert_range is not None:
            lo, hi = self.expert_range
            self.exit_steps = [i for i, t in enumerate(self.step_timesteps.tolist()) if lo <= t <= hi]
            if not self.exit_steps:
                raise RecipeError(f"method_config.dmd_denoising_steps: no step of {cfg.dmd_denoising_steps} "
                                  f"(shifted: {[round(t, 1) for t in self.step_timesteps.tolist()]}) falls in the "
                                  f"timestep range the student trains, [{lo:g}, {hi:g}]; choose steps in it or "
                                  "train the whole student")
        self.ema = PartitionedEMA(self.student.module, cfg.ema_decay, self.strategy) if cfg.ema_decay > 0 else None
        self.gan = self.gan_on(cfg)
        self.gan_scalars: dict[str, float] = {}

    # -- pieces ---------------------------------------------------------------------------------
    def score_timesteps(self, b: TrainingBatch, stream: str, floor: Optional[float] = None) -> torch.Tensor:
        """t' per sample: uniform raw in [0, 1000), shifted, clamped to [min, max] * 1000; with a `floor` (see
        `phased_scores`) the same distribution restricted to [max(min, floor), max]."""
        u = rng.per_sample_rand(b.sample_ids, self.seed, stream)
        lo, hi = self.config.min_timestep_ratio * 1000.0, self.config.max_timestep_ratio * 1000.0
        if self.expert_range is not None or floor is not None:
            # The shifted distribution restricted to the trained expert's range and the floor: u uniform between
            # the raw timesteps whose shifts are the range's ends (the shift is monotonic).
            if self.expert_range is not None:
                lo, hi = max(lo, self.expert_range[0]), min(hi, self.expert_range[1])
            if floor is not None:
                lo = min(max(lo, floor), hi)
            shift = float(self.adapter.flow_shift)
            raw_lo, raw_hi = ((x / 1000.0) / (shift - (shift - 1.0) * x / 1000.0) for x in (lo, hi))
            u = raw_lo + u * (raw_hi - raw_lo)
        t = self.adapter.shift_timesteps(u * 1000.0)
        return t.clamp(lo, hi)

    def exit_index(self, stream: str, step: int) -> int:
        """The step k at which a rollout on `stream` stops at iteration `step` (the same on every rank)."""
        return self.exit_steps[rng.shared_randint(len(self.exit_steps), self.seed, stream, step)]

    def score_floor(self, k: int) -> Optional[float]:
        """Lowest score timestep for the output of step k: step k+1's timestep under `phased_scores`, else none."""
        if not self.config.phased_scores or k + 1 >= len(self.step_timesteps):
            return None
        return float(self.step_timesteps[k + 1])

    def critic_exit(self, step: int) -> int:
        """Where the critic's rollout stops: a random step, or the last under `critic_rollout: final`."""
        return self.exit_steps[-1] if self.config.critic_rollout == "final" else self.exit_index("critic_rollout", step)

    def student_sample(self, b: TrainingBatch, step: int, with_grad: bool, stream: str,
                       k: Optional[int] = None) -> torch.Tensor:
        """x0 from the student's few-step schedule, stopping at step k (default: the shared `exit_index`); graph only
        at step k."""
        a, steps = self.adapter, self.step_timesteps
        k = self.exit_index(stream, step) if k is None else k
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
    def dmd_target(self, x0_gen: torch.Tensor, b: TrainingBatch, floor: Optional[float] = None) -> torch.Tensor:
        """stopgrad(x0_gen - g) with g = (fake - real) / mean|x0_gen - real| per sample."""
        a, w = self.adapter, self.config.real_score_guidance_scale
        x0 = x0_gen.detach()
        t = self.score_timesteps(b, "score_timestep", floor)
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

    def gan_timesteps(self, b: TrainingBatch, stream: str) -> torch.Tensor:
        """The GAN's noising timestep per sample (shared by the real latent and the student sample of a row)."""
        name, extra = GAN_STREAMS[stream]
        u = rng.per_sample_rand(b.sample_ids, self.seed, name, extra=extra) * 1000.0
        t = self.adapter.shift_timesteps(u) if self.config.gan_timestep == "shifted" else u
        hi = self.config.gan_max_timestep_ratio
        hi = self.config.max_timestep_ratio if hi is None else hi
        return t.clamp(self.config.min_timestep_ratio * 1000.0, hi * 1000.0)

    def noised_for_gan(self, x0s: list[torch.Tensor], b: TrainingBatch, t: torch.Tensor, stream: str) -> torch.Tensor:
        """Each batch of x0s noised at the same t per row, with independent noise, stacked [n*B, ...]."""
        name, extra = GAN_STREAMS[stream]
        return torch.cat([self.adapter.add_noise(x0, rng.per_sample_randn(
            b.latent_shape, b.sample_ids, self.seed, name, extra=extra + i, device=x0.device), t)
            for i, x0 in enumerate(x0s)])

    def head(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The discriminator head on the critic (logits [B], fp32)."""
        return getattr(self.critic.module, GAN_HEAD)(features)

    def generator_loss(self, b: TrainingBatch, step: int) -> torch.Tensor:
        k = self.exit_index("rollout_noise", step)
        x0_gen = self.student_sample(b, step, with_grad=True, stream="rollout_noise", k=k)
        target = self.dmd_target(x0_gen, b, self.score_floor(k))
        loss = 0.5 * self.mse(x0_gen, target)
        if self.gan:  # through the frozen critic and head: only the student gets gradients
            t = self.gan_timesteps(b, "gan_timestep")
            x_t = self.noised_for_gan([x0_gen], b, t, "gan_noise")
            _, feats = self.adapter.predict_noise_and_features(self.critic, x_t, t, b.cond,
                                                               self.config.gan_feature_blocks)
            gan = generator_gan_loss(self.head(feats))
            self.gan_scalars["student/gan_loss"] = float(gan.detach())
            loss = loss + self.config.gan_loss_weight_gen * gan
        return loss

    def critic_loss(self, b: TrainingBatch, step: int) -> torch.Tensor:
        a = self.adapter
        k = self.critic_exit(step)
        x0 = self.student_sample(b, step, with_grad=False, stream="critic_rollout", k=k).detach()
        t = self.score_timesteps(b, "critic_timestep", self.score_floor(k))
        eps = rng.per_sample_randn(b.latent_shape, b.sample_ids, self.seed, "critic_noise", device=x0.device)
        x_t = a.add_noise(x0, eps, t)
        if not self.gan:
            return self.mse(a.predict_noise(self.critic, x_t, t, b.cond), eps - x0)
        # one critic forward: flow-matching rows, then student samples and real latents noised at the same t_gan
        t_gan = self.gan_timesteps(b, "critic_gan_timestep")
        x_gan = self.noised_for_gan([x0, b.latents.to(x0)], b, t_gan, "critic_gan_noise")
        n = b.batch_size
        v, feats = a.predict_noise_and_features(self.critic, torch.cat([x_t, x_gan]), torch.cat([t, t_gan, t_gan]),
                                                b.cond.repeat(3, 1, 1), self.config.gan_feature_blocks)
        loss = self.mse(v[:n], eps - x0)
        fake, real = self.head([f[n:] for f in feats]).chunk(2)
        gan = critic_gan_loss(fake, real)
        self.gan_scalars.update({"critic/gan_loss": float(gan.detach()),
                                 "critic/d_real": float(torch.sigmoid(real.detach()).mean()),
                                 "critic/d_fake": float(torch.sigmoid(fake.detach()).mean())})
        return loss + self.config.gan_loss_weight_critic * gan

    def updates_student(self, step: int) -> bool:
        """Same answer on every rank: a function of the step only."""
        return step % self.config.generator_update_interval == 0

    # -- the iteration --------------------------------------------------------------------------
    def train_one_step(self, micro_batches: list[dict], step: int) -> dict[str, float]:
        (raw,) = micro_batches
        source = "data" if self.config.rollout_mode == "data" or self.gan else "zeros"
        b = self.adapter.prepare_batch(raw, latents_source=source)
        out = {}
        self.gan_scalars = {}
        if self.updates_student(step):
            with self.critic_frozen():
                loss = self.generator_loss(b, step)
                if self.update(self.student, loss, step) and self.ema is not None:
                    self.ema.update(step, self.config.ema_start_step)
            out["student/loss"] = float(loss.detach())
        loss = self.critic_loss(b, step)
        self.update(self.critic, loss, step)
        out["critic/loss"] = float(loss.detach())
        out.update(self.gan_scalars)
        return out

    @contextlib.contextmanager
    def critic_frozen(self):
        """While the student's GAN loss flows through the critic and head, they hold no gradient (ZeRO-3's
        gradient bucketing of the critic must not see the student's backward); restores exactly what trained."""
        if not self.gan:
            yield
            return
        trained = [p for p in self.critic.module.parameters() if p.requires_grad]
        for p in trained:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in trained:
                p.requires_grad_(True)

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

"""Wan adapter: flow-matching primitives over WanTransformer3DModel roles (Wan2.1, Wan2.2 TI2V-5B, and Wan2.2 A14B's
two experts as one `WanExperts` module, which routes each sample itself)."""
from __future__ import annotations

from typing import Literal

import torch

from ds_distill.adapters.base import TrainingBatch
from ds_distill.models.components import ModelComponents
from ds_distill.errors import RecipeError
from ds_distill.models.wan_common import WanExperts, expands_timesteps, latent_shape_for, timestep_input
from ds_distill.ops import add_noise as fused_add_noise
from ds_distill.ops import sde_step as fused_sde_step
from ds_distill.ops import sigma_from_timestep
from ds_distill.roles import RoleHandle

NUM_TRAIN_TIMESTEPS = 1000


class WanAdapter:
    """Turns Wan components into the primitives of `DiffusionAdapter`. Timesteps passed in are *shifted*
    model timesteps (what the transformer sees, sigma * 1000) unless a name says `raw`."""

    def __init__(self, comps: ModelComponents, pipeline_config, training, device: torch.device):
        vae = comps.vae_config
        c = vae.get("z_dim", comps.transformer_config.get("in_channels", 16))
        self.latents_mean = torch.tensor(vae.get("latents_mean", [0.0] * c), dtype=torch.float32).view(1, c, 1, 1, 1)
        self.latents_std = torch.tensor(vae.get("latents_std", [1.0] * c), dtype=torch.float32).view(1, c, 1, 1, 1)
        self.flow_shift = float(pipeline_config.flow_shift)
        self.dtype = torch.bfloat16 if training.mixed_precision == "bf16" else torch.float32
        self.device = device
        self.text_len = training.text_len
        self.text_dim = comps.transformer_config.get("text_dim", 4096)
        self.sample_latent_shape = latent_shape_for(vae, training.num_frames, training.height, training.width)
        self.uncond_embedding = torch.zeros(self.text_len, self.text_dim)
        self.expand_timesteps = expands_timesteps(comps.model_index)

    # -- data -----------------------------------------------------------------------------------
    def set_uncond_embedding(self, embedding: torch.Tensor) -> None:
        """The unconditional condition [L, D] (padded/cropped to text_len)."""
        out = torch.zeros(self.text_len, embedding.shape[-1])
        n = min(self.text_len, embedding.shape[0])
        out[:n] = embedding[:n].float()
        self.uncond_embedding = out

    def normalize_latents(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the per-channel normalised space the transformer works in."""
        return (raw.float() - self.latents_mean.to(raw.device)) / self.latents_std.to(raw.device)

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of normalize_latents (what the VAE decodes)."""
        return z.float() * self.latents_std.to(z.device) + self.latents_mean.to(z.device)

    def prepare_batch(self, raw: dict, latents_source: Literal["data", "zeros"] = "data") -> TrainingBatch:
        """Collated loader output -> TrainingBatch on this rank's device."""
        dev = self.device
        cond = raw["text_embedding"].to(dev, self.dtype)
        b = cond.shape[0]
        latents = None
        shape = self.sample_latent_shape
        if latents_source == "data":
            if "vae_latent" not in raw:
                raise ValueError("latents_source='data' needs vae_latent columns in the dataset")
            latents = self.normalize_latents(raw["vae_latent"].to(dev))
            shape = tuple(latents.shape[1:])
        uncond = self.uncond_embedding.to(dev, self.dtype).unsqueeze(0).expand(b, -1, -1)
        return TrainingBatch(
            latents=latents,
            latent_shape=tuple(shape),
            cond=cond,
            cond_mask=raw["text_mask"].to(dev),
            uncond=uncond,
            sample_ids=raw["sample_ids"],
            captions=list(raw.get("caption", [])),
        )

    # -- noise levels ---------------------------------------------------------------------------
    def shift_timesteps(self, t_raw: torch.Tensor) -> torch.Tensor:
        """Raw timesteps in [0, 1000] -> shifted model timesteps 1000 * sigma."""
        t_raw = torch.as_tensor(t_raw, dtype=torch.float32)
        return sigma_from_timestep(t_raw, shift=self.flow_shift) * NUM_TRAIN_TIMESTEPS

    @staticmethod
    def sigma(t: torch.Tensor) -> torch.Tensor:
        """Noise level of shifted timesteps."""
        return torch.as_tensor(t, dtype=torch.float32) / NUM_TRAIN_TIMESTEPS

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - sigma) x0 + sigma eps, sigma computed per sample inside the fused op."""
        return fused_add_noise(x0, eps, t.to(x0.device), shift=1.0)

    # -- model calls ----------------------------------------------------------------------------
    def predict_noise(self, role: RoleHandle, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Velocity prediction of a role, in fp32."""
        out = role(
            hidden_states=x_t.to(self.device, self.dtype),
            timestep=timestep_input(t.to(self.device, torch.float32), x_t, self.expand_timesteps),
            encoder_hidden_states=cond.to(self.device, self.dtype),
            return_dict=False,
        )[0]
        return out.float()

    # -- feature taps (forward hooks on transformer blocks) -----------------------------------------
    @staticmethod
    def _one_transformer(module: torch.nn.Module) -> None:
        if isinstance(module, WanExperts):
            raise RecipeError("method_config.gan_loss_weight_gen: DMD2's GAN term taps one transformer's blocks; a "
                              "two-expert Wan2.2 role has two (set gan_loss_weight_gen: 0)")

    @staticmethod
    def feature_dim(module: torch.nn.Module) -> int:
        """Width of a block's hidden states (heads x head dim)."""
        WanAdapter._one_transformer(module)
        return int(module.config.num_attention_heads * module.config.attention_head_dim)

    @staticmethod
    def num_blocks(module: torch.nn.Module) -> int:
        """How many transformer blocks a feature tap may name."""
        WanAdapter._one_transformer(module)
        return len(module.blocks)

    def predict_noise_and_features(self, role: RoleHandle, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                                   blocks: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One forward of the role: its velocity (fp32) and the hidden states [B, N, D] leaving the chosen blocks
        (forward hooks). One call per batch: ZeRO-3 reduces a block's gradients once per backward of each call, so
        whatever one loss needs from a role goes through in one batch. A role whose parameters are frozen for this
        pass (the critic inside the student's loss) is called as its bare module, never through its engine."""
        module = role.module
        taps: dict[int, torch.Tensor] = {}
        hooks = [module.blocks[i].register_forward_hook(lambda _m, _a, out, i=i: taps.__setitem__(i, out))
                 for i in blocks]
        frozen = not any(p.requires_grad for p in module.blocks.parameters())
        call = module if frozen else role
        try:
            v = call(hidden_states=x_t.to(self.device, self.dtype),
                     timestep=timestep_input(t.to(self.device, torch.float32), x_t, self.expand_timesteps),
                     encoder_hidden_states=cond.to(self.device, self.dtype), return_dict=False)[0]
        finally:
            for h in hooks:
                h.remove()
        return v.float(), [taps[i] for i in blocks]

    def predict_x0(self, role: RoleHandle, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x0_hat = x_t - sigma v (fp32)."""
        v = self.predict_noise(role, x_t, t, cond)
        x0, _ = fused_sde_step(x_t.float(), v, self.sigma(t).to(v.device), 0.0, None)
        return x0

    def sde_step(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor, t_next, eps):
        """(x0_hat, x at t_next) from one velocity prediction; eps None on the last step."""
        s_next = self.sigma(t_next).to(v.device) if t_next is not None else 0.0
        return fused_sde_step(x_t.float(), v, self.sigma(t).to(v.device), s_next, eps)

    def backward(self, role: RoleHandle, loss: torch.Tensor) -> None:
        """Backward through the role's own DeepSpeed engine."""
        role.engine.backward(loss)

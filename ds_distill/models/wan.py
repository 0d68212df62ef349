"""The Wan2.1 family: loads roles from Diffusers-format Wan T2V directories."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ds_distill.dispatch import register_family
from ds_distill.models.components import (
    ModelComponents,
    load_weights_streaming,
    read_components,
    resolve_model_dir,
    transformer_dir,
)

logger = logging.getLogger("ds_distill")


def latent_shape_for(vae_config: dict, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Latent [C, T, H, W] of a video of this size under the Wan VAE (4x temporal, 8x spatial by default)."""
    t_scale = vae_config.get("scale_factor_temporal", 4)
    s_scale = vae_config.get("scale_factor_spatial", 8)
    c = vae_config.get("z_dim", 16)
    return (c, (num_frames - 1) // t_scale + 1, height // s_scale, width // s_scale)


class PromptEncoder:
    """The family's tokenizer + text encoder, as WanPipeline encodes prompts (padding stripped to real length)."""

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu", dtype=torch.float32):
        from transformers import AutoTokenizer, UMT5EncoderModel

        model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir / "tokenizer")
        self.encoder = UMT5EncoderModel.from_pretrained(model_dir / "text_encoder", torch_dtype=dtype).to(device)
        self.encoder.eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, prompts: list[str], text_len: int) -> list[torch.Tensor]:
        """One [seq_len, D] fp32 tensor per prompt (seq_len <= text_len)."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        out = []
        for prompt in prompts:
            tokens = self.tokenizer(
                [prompt_clean(prompt)],
                padding="max_length",
                max_length=text_len,
                truncation=True,
                add_special_tokens=True,
                return_attention_mask=True,
                return_tensors="pt",
            )
            mask = tokens.attention_mask.to(self.device)
            hidden = self.encoder(tokens.input_ids.to(self.device), mask).last_hidden_state[0]
            out.append(hidden[: int(mask.sum())].float().cpu())
        return out


def encode_prompts(model_dir: str | Path, prompts: list[str], text_len: int) -> list[torch.Tensor]:
    """Encode prompts with a model directory's text encoder (loads and frees it)."""
    return PromptEncoder(model_dir)(prompts, text_len)


@register_family("wan")
class WanFamily:
    """Loads Wan2.1 T2V roles (WanTransformer3DModel) and builds the Wan adapter and validator."""

    name = "wan"
    zero3_leaf_modules = ("WanTransformerBlock",)
    """ZeRO-3 fetches a whole transformer block at once: 1.5x faster steps on the tiny model, same numbers."""

    def components(self, path: str, source: str, key: str) -> ModelComponents:
        """Configs of a role's directory (no weights)."""
        return read_components(resolve_model_dir(path, source, key))

    def load_transformer(self, comps: ModelComponents, strategy, ds_config: dict, use_zero_init: bool = True):
        """Build the transformer partitioned at creation (zero.Init) and stream its weights in."""
        from diffusers import WanTransformer3DModel

        config = {k: v for k, v in comps.transformer_config.items() if not k.startswith("_")}
        if use_zero_init:
            with strategy.zero_init(ds_config):
                module = WanTransformer3DModel.from_config(config)
        else:
            module = WanTransformer3DModel.from_config(config).to(strategy.param_dtype(ds_config))
        load_weights_streaming(module, transformer_dir(comps.path), strategy.dist.rank)
        return module

    def build_adapter(self, comps: ModelComponents, pipeline_config, training, device):
        """The operation-centric primitives methods use."""
        from ds_distill.adapters.wan import WanAdapter

        return WanAdapter(comps, pipeline_config, training, device)

    def build_validator(self, comps: ModelComponents, recipe, strategy, tracker):
        """The validator that renders videos with this family's pipeline."""
        from ds_distill.validators.wan import WanValidator

        return WanValidator(comps, recipe, strategy, tracker)

    def check_unconditional(self, comps: ModelComponents, training, source: str) -> None:
        """Preflight: the unconditional condition the recipe asks for can be made (no encoder is loaded)."""
        from ds_distill.errors import RecipeError

        if training.uncond_embedding == "zeros":
            return
        if training.negative_prompt_embedding:
            self._embedding_file(comps, training, source)
        elif not (comps.path / "text_encoder").is_dir():
            raise RecipeError(
                f"{source}: training.negative_prompt: {comps.path} has no text_encoder/ to encode it; set "
                "training.negative_prompt_embedding to a precomputed file or training.uncond_embedding: zeros"
            )

    @staticmethod
    def _embedding_file(comps: ModelComponents, training, source: str) -> torch.Tensor:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from ds_distill.errors import RecipeError

        dim = comps.transformer_config.get("text_dim", 4096)
        path = Path(training.negative_prompt_embedding)
        key = "training.negative_prompt_embedding"
        if not path.is_file():
            raise RecipeError(f"{source}: {key}: file {path} not found")
        try:
            emb = load_file(str(path))["embedding"]
        except (SafetensorError, KeyError, OSError) as exc:
            raise RecipeError(f"{source}: {key}: {path} must be a .safetensors file with an `embedding` "
                              f"tensor [L, D] ({type(exc).__name__})") from None
        if emb.dim() != 2 or emb.shape[1] != dim:
            raise RecipeError(f"{source}: {key}: expected [L, {dim}], got {list(emb.shape)}")
        return emb.float()

    def unconditional_embedding(self, comps: ModelComponents, training, strategy, source: str) -> torch.Tensor:
        """The unconditional text condition [L, D]: zeros, a precomputed file, or the encoded negative prompt.

        The text encoder (UMT5-XXL for real Wan) is loaded on rank 0 only, used once, and freed.
        """
        self.check_unconditional(comps, training, source)
        if training.uncond_embedding == "zeros":
            return torch.zeros(training.text_len, comps.transformer_config.get("text_dim", 4096))
        if training.negative_prompt_embedding:
            return self._embedding_file(comps, training, source)
        emb = None
        if strategy.dist.is_main:
            emb = PromptEncoder(comps.path)([training.negative_prompt], training.text_len)[0]
        return strategy.broadcast_object(emb)

    def prompt_encoder(self, comps: ModelComponents) -> PromptEncoder:
        """This family's text encoder (loaded on demand)."""
        return PromptEncoder(comps.path)

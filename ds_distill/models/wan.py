"""The Wan family: loads roles from Diffusers-format Wan directories and wires the Wan adapter and validator.

The pieces those share live in `ds_distill.models.wan_common`, the leaf module the three import.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ds_distill.adapters.wan import WanAdapter
from ds_distill.dispatch import register_family
from ds_distill.errors import RecipeError
from ds_distill.models.components import (
    ModelComponents,
    load_weights_streaming,
    read_components,
    resolve_model_dir,
    transformer_dir,
)
from ds_distill.models.wan_common import (
    EXPERT_FOLDERS,
    EXPERTS,
    PromptEncoderCache,
    WanExperts,
    add_lora,
    boundary_timestep,
    keep_diffusers_fp32,
    load_plain_transformer,
    timestep_fn,
)
from ds_distill.validators.wan import WanValidator

logger = logging.getLogger("ds_distill")


@register_family("wan")
class WanFamily(PromptEncoderCache):
    """Loads Wan2.1 T2V roles (WanTransformer3DModel) and builds the Wan adapter and validator."""

    name = "wan"
    zero3_leaf_modules = ("WanTransformerBlock",)
    """ZeRO-3 fetches a whole transformer block at once: 1.5x faster steps on the tiny model, same numbers."""

    def enable_sequence_parallel(self, module, sp) -> None:
        """Wire DeepSpeed-Ulysses into every Wan transformer of a role (`ds_distill.models.wan_ulysses`)."""
        from ds_distill.models.wan_ulysses import install_wan

        install_wan(module, sp)

    def components(self, path: str, source: str, key: str) -> ModelComponents:
        """Configs of a role's directory (no weights)."""
        return read_components(resolve_model_dir(path, source, key))

    def load_transformer(self, comps: ModelComponents, strategy, ds_config: dict, use_zero_init: bool = True,
                         trainable: bool = True, lora=None, experts=None):
        """Build the transformer partitioned at creation (zero.Init) and stream its weights in.

        Diffusers' fp32 modules (see `keep_diffusers_fp32`) are computed in fp32 in every role; a frozen role built
        under zero.Init also stores them in fp32, so it is the model `from_pretrained(torch_dtype=bf16)` gives.
        With `lora` (a `LoraSpec`), adapters are added once the base weights are in (see `add_lora`).
        A Wan2.2 A14B directory (`transformer_2` and `boundary_ratio` in model_index.json) gives one `WanExperts`
        module holding both; `experts` (recipe `roles.<name>.experts`) names those that train (default: both).
        """
        boundary = boundary_timestep(comps.model_index)
        if boundary is None:
            module = self._load_one(comps.transformer_config, transformer_dir(comps.path), strategy, ds_config,
                                    use_zero_init, trainable)
            if lora is not None:
                add_lora(module, lora)
            return module
        if lora is not None:
            raise RecipeError(f"{comps.path}: LoRA on a two-expert Wan2.2 model is not supported; train the experts' "
                              "full weights (roles.<name>.experts picks which) or drop roles.<name>.lora")
        trained = tuple(experts or EXPERTS)
        parts = {}
        for name in EXPERTS:
            folder = comps.path / EXPERT_FOLDERS[name]
            config = json.loads((folder / "config.json").read_text())
            parts[name] = self._load_one(config, folder, strategy, ds_config, use_zero_init,
                                         trainable and name in trained)
        return WanExperts(parts["high"], parts["low"], boundary, trained)

    @staticmethod
    def _load_one(transformer_config: dict, folder: Path, strategy, ds_config: dict, use_zero_init: bool,
                  trainable: bool):
        """One WanTransformer3DModel from its config, partitioned at creation, weights streamed from `folder`."""
        from diffusers import WanTransformer3DModel

        config = {k: v for k, v in transformer_config.items() if not k.startswith("_")}
        if use_zero_init:
            # DeepSpeed 0.19.8 takes memory_efficient_linear from the config (default true) over zero.Init's argument
            # and then replaces torch.nn.functional.linear process-wide with a matmul and a separate bias add (two
            # bf16 roundings), so every model in the process would stop computing as diffusers does.
            zero_cfg = {**ds_config, "zero_optimization": {"memory_efficient_linear": False,
                                                           **ds_config.get("zero_optimization", {})}}
            with strategy.zero_init(zero_cfg):
                module = WanTransformer3DModel.from_config(config)
        else:
            module = WanTransformer3DModel.from_config(config).to(strategy.param_dtype(ds_config))
        keep_diffusers_fp32(module, fp32_storage=use_zero_init and not trainable
                            and ds_config.get("zero_optimization", {}).get("offload_param", {}).get("device") != "nvme")
        load_weights_streaming(module, folder, strategy.dist.rank)
        return module

    def build_adapter(self, comps: ModelComponents, pipeline_config, training, device):
        """The operation-centric primitives methods use."""
        return WanAdapter(comps, pipeline_config, training, device)

    def build_validator(self, comps: ModelComponents, recipe, strategy, tracker):
        """The validator that renders videos with this family's pipeline."""
        return WanValidator(comps, recipe, strategy, tracker, prompt_source=self)

    @staticmethod
    def check_experts(comps: ModelComponents, spec, source: str, key: str) -> None:
        """Preflight: `roles.<name>.experts` names experts of a two-expert (Wan2.2 A14B) directory."""
        if spec.experts is None:
            return
        if not spec.experts or len(set(spec.experts)) != len(spec.experts) or set(spec.experts) - set(EXPERTS):
            raise RecipeError(f"{source}: {key}.experts: expected [high], [low] or [high, low], got {spec.experts}")
        if boundary_timestep(comps.model_index) is None:
            raise RecipeError(f"{source}: {key}.experts: {comps.path} has one transformer (its model_index.json has "
                              "no transformer_2 and boundary_ratio); remove the key")

    # -- what the generic layers ask the family (export, sample, eval-toy, preflight) --------------------------
    transformer_folders = tuple(EXPERT_FOLDERS.values())
    """The pipeline folders that hold a role's weights; an export with --base copies every other component."""

    @staticmethod
    def trained_parts(comps: ModelComponents, spec) -> dict[str, dict]:
        """{parameter name prefix: transformer config} of what a trainable role trains (what its checkpoints hold):
        one transformer (prefix ""), or the trained experts of a two-expert directory (`high.`, `low.`)."""
        if boundary_timestep(comps.model_index) is None:
            return {"": comps.transformer_config}
        return {f"{e}.": json.loads((comps.path / EXPERT_FOLDERS[e] / "config.json").read_text())
                for e in (spec.experts or EXPERTS)}

    @staticmethod
    def export_components(tensor_names: list[str]) -> dict[str, str] | None:
        """Where an export writes a role's checkpoint tensors: {pipeline folder: the prefix of its tensors' names},
        or None for one transformer (`transformer/`, names as they are). A two-expert role (`high.*`, `low.*`) maps
        to both experts' folders; one without tensors stayed frozen, and the export copies the base's."""
        prefixes = {n.split(".", 1)[0] for n in tensor_names}
        if not prefixes or not prefixes <= set(EXPERTS):
            return None
        return {EXPERT_FOLDERS[e]: f"{e}." for e in EXPERTS}

    @staticmethod
    def load_plain_module(model_dir: str | Path, dtype: torch.dtype) -> torch.nn.Module:
        """A Diffusers directory's denoiser for sampling outside DeepSpeed (`load_plain_transformer`)."""
        return load_plain_transformer(model_dir, dtype)

    @staticmethod
    def timestep_fn(model_index: dict):
        """How a plain denoiser's `timestep` input is made from t and the latents (`wan_common.timestep_fn`)."""
        return timestep_fn(model_index)

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

        The text encoder (UMT5-XXL for real Wan) is loaded on rank 0 only (see `prompt_encoder`). With validation on,
        it is kept for the validator's captions, which releases it; otherwise it is freed here.
        """
        self.check_unconditional(comps, training, source)
        if training.uncond_embedding == "zeros":
            return torch.zeros(training.text_len, comps.transformer_config.get("text_dim", 4096))
        if training.negative_prompt_embedding:
            return self._embedding_file(comps, training, source)
        emb = None
        if strategy.dist.is_main:
            emb = self.prompt_encoder(comps, strategy.dist.device)([training.negative_prompt], training.text_len)[0]
            if not training.log_validation:
                self.release_prompt_encoder()
        return strategy.broadcast_object(emb)

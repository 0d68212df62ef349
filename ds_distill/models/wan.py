"""The Wan2.1 family: loads roles from Diffusers-format Wan T2V directories."""
from __future__ import annotations

import logging
from functools import partial
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
from ds_distill.utils.module_state import lora_parameter_names

logger = logging.getLogger("ds_distill")


def latent_shape_for(vae_config: dict, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Latent [C, T, H, W] of a video of this size under the Wan VAE (4x temporal, 8x spatial by default)."""
    t_scale = vae_config.get("scale_factor_temporal", 4)
    s_scale = vae_config.get("scale_factor_spatial", 8)
    c = vae_config.get("z_dim", 16)
    return (c, (num_frames - 1) // t_scale + 1, height // s_scale, width // s_scale)


def text_encoder_dtype(device: str | torch.device) -> torch.dtype:
    """Training's text encoder precision: bf16 on accelerators (UMT5-XXL: ~11 GB instead of ~23 GB, as WanPipeline
    runs it in bf16), fp32 on the CPU, where bf16 matmuls are slow on most processors."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


class PromptEncoder:
    """The family's tokenizer + text encoder, as WanPipeline encodes prompts (padding stripped to real length)."""

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu", dtype=torch.float32):
        from transformers import AutoTokenizer, UMT5EncoderModel

        model_dir = Path(model_dir)
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir / "tokenizer")
        self.encoder = UMT5EncoderModel.from_pretrained(model_dir / "text_encoder", torch_dtype=dtype).to(device)
        self.encoder.eval()
        self.device = device
        self.dtype = dtype

    def close(self) -> None:
        """Free the encoder's weights (host or accelerator memory)."""
        self.encoder = None
        if torch.device(self.device).type != "cpu":
            from deepspeed.accelerator import get_accelerator

            get_accelerator().empty_cache()

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


def fp32_parameter_names(module: torch.nn.Module) -> list[str]:
    """Parameters diffusers keeps in fp32 when this model is loaded in bf16: its `_keep_in_fp32_modules`, matched
    against the dotted name's parts as diffusers matches them (Wan: time embedder, scale_shift_tables, norm2)."""
    keep = getattr(type(module), "_keep_in_fp32_modules", None) or []
    return [n for n, _ in module.named_parameters() if any(k in n.split(".") for k in keep)]


def _fp32_linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = layer.bias.float() if layer.bias is not None else None
    return torch.nn.functional.linear(x.float(), layer.weight.float(), bias)


def keep_diffusers_fp32(module: torch.nn.Module, fp32_storage: bool) -> list[str]:
    """Make a (possibly ZeRO-3 partitioned) Wan transformer compute as diffusers runs it in bf16.

    - The rotary tables are rebuilt outside zero.Init (inside it `torch.arange` yields the training dtype, which
      rounds the frequencies; buffers are never partitioned).
    - The time embedder runs in fp32 on the fp32 sinusoid. Diffusers casts its input to the embedder's parameter
      dtype, fp32 there; with bf16 storage the input would be rounded first.
    - With `fp32_storage`, the parameters of `fp32_parameter_names` are stored in fp32 (partition and placeholder).
      Trainable roles keep bf16 storage: DeepSpeed's ZeRO-3 optimizer flattens a role's partitions into one
      buffer of one dtype (its fp32 master copies hold the exact values); they are computed in fp32 all the same
      (block scale/shift tables and norm2 already are in diffusers' code; the output table's sum is made fp32).
    Returns the names of the parameters stored in fp32.
    """
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    rope = module.rope
    fresh = WanRotaryPosEmbed(rope.attention_head_dim, rope.patch_size, rope.max_seq_len)
    rope.freqs_cos = fresh.freqs_cos.to(rope.freqs_cos.device)
    rope.freqs_sin = fresh.freqs_sin.to(rope.freqs_sin.device)

    embedder = module.condition_embedder
    sinusoid: list[torch.Tensor] = []

    def keep_sinusoid(_mod, _args, output):
        sinusoid[:] = [output]

    def fp32_input(_mod, args):
        x = sinusoid.pop().reshape(args[0].shape) if sinusoid else args[0]
        return (x.float(), *args[1:])

    embedder.timesteps_proj.register_forward_hook(keep_sinusoid)
    embedder.time_embedder.register_forward_pre_hook(fp32_input)
    for layer in (embedder.time_embedder.linear_1, embedder.time_embedder.linear_2):
        layer.forward = partial(_fp32_linear, layer)

    # The output scale_shift_table is added to the time embedding, which diffusers rounds to bf16: in fp32 when the
    # table is fp32. Handing the table the embedding as fp32 (its bf16 values, exactly) makes that sum fp32 for a
    # bf16-stored table too, and leaves it unchanged for an fp32 one. (Swapping the parameter itself for an fp32
    # copy would break ZeRO-3, which walks the root's parameters while releasing other modules.)
    def temb_in_fp32(_mod, _args, output):
        return (output[0].float(), *output[1:])

    embedder.register_forward_hook(temb_in_fp32)

    names = fp32_parameter_names(module) if fp32_storage else []
    params = dict(module.named_parameters())
    for n in names:
        p = params[n]
        for attr in ("ds_tensor", "ds_secondary_tensor"):
            part = getattr(p, attr, None)
            if part is not None:
                part.data = part.data.float()
        p.data = p.data.float()
    return names


LORA_SEED = 0
"""Adapters are initialised from this seed: the same weights on every rank and for every rank count."""


def lora_config(spec):
    """The peft `LoraConfig` of a recipe's `roles.<name>.lora` (a `LoraSpec`)."""
    from peft import LoraConfig

    init = {"default": True, "gaussian": "gaussian"}[spec.init]
    return LoraConfig(r=int(spec.rank), lora_alpha=float(spec.alpha), target_modules=list(spec.target_modules),
                      lora_dropout=float(spec.dropout), init_lora_weights=init)


def add_lora(module: torch.nn.Module, spec) -> list[str]:
    """Add low-rank adapters with diffusers' `add_adapter` (peft); returns the adapter parameter names.

    Call after the base weights are loaded: peft renames each wrapped layer's weight to `<name>.base_layer.weight`.
    On a module built under zero.Init the base stays partitioned and the adapters are plain tensors until
    `deepspeed.initialize` partitions them (DeepSpeed converts a model's non-ZeRO parameters, broadcasting rank 0's
    values); they are made from `LORA_SEED`, so every rank and rank count starts from the same adapters.

    With the base frozen, nothing before the first block needs a gradient, so its input would not require one; the
    ZeRO-3 backward hooks of a leaf block (`zero3_leaf_modules`) then do not gather its weights for backward (a
    size-0 weight in DeepSpeed 0.19.8). The patch embedding's output is made to require grad while grad is on
    (what transformers' `enable_input_require_grads` does for adapters).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(LORA_SEED)
        module.add_adapter(lora_config(spec))
    module.patch_embedding.register_forward_hook(_output_requires_grad)
    return lora_parameter_names(module)


def _output_requires_grad(_mod, _args, output: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and not output.requires_grad:
        output.requires_grad_(True)
    return output


@register_family("wan")
class WanFamily:
    """Loads Wan2.1 T2V roles (WanTransformer3DModel) and builds the Wan adapter and validator."""

    name = "wan"
    zero3_leaf_modules = ("WanTransformerBlock",)
    """ZeRO-3 fetches a whole transformer block at once: 1.5x faster steps on the tiny model, same numbers."""

    def components(self, path: str, source: str, key: str) -> ModelComponents:
        """Configs of a role's directory (no weights)."""
        return read_components(resolve_model_dir(path, source, key))

    def load_transformer(self, comps: ModelComponents, strategy, ds_config: dict, use_zero_init: bool = True,
                         trainable: bool = True, lora=None):
        """Build the transformer partitioned at creation (zero.Init) and stream its weights in.

        Diffusers' fp32 modules (see `keep_diffusers_fp32`) are computed in fp32 in every role; a frozen role built
        under zero.Init also stores them in fp32, so it is the model `from_pretrained(torch_dtype=bf16)` gives.
        With `lora` (a `LoraSpec`), adapters are added once the base weights are in (see `add_lora`).
        """
        from diffusers import WanTransformer3DModel

        config = {k: v for k, v in comps.transformer_config.items() if not k.startswith("_")}
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
        load_weights_streaming(module, transformer_dir(comps.path), strategy.dist.rank)
        if lora is not None:
            add_lora(module, lora)
        return module

    def build_adapter(self, comps: ModelComponents, pipeline_config, training, device):
        """The operation-centric primitives methods use."""
        from ds_distill.adapters.wan import WanAdapter

        return WanAdapter(comps, pipeline_config, training, device)

    def build_validator(self, comps: ModelComponents, recipe, strategy, tracker):
        """The validator that renders videos with this family's pipeline."""
        from ds_distill.validators.wan import WanValidator

        return WanValidator(comps, recipe, strategy, tracker, prompt_source=self)

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

    def prompt_encoder(self, comps: ModelComponents, device: str | torch.device = "cpu") -> PromptEncoder:
        """This family's text encoder, loaded once (in `text_encoder_dtype(device)`) and kept until
        `release_prompt_encoder`: start-up's negative prompt and the validation captions share one load."""
        current = getattr(self, "_prompt_encoder", None)
        if current is None or current.model_dir != Path(comps.path) or current.device != device:
            self.release_prompt_encoder()
            logger.info("loading the text encoder of %s in %s on %s", comps.path,
                        str(text_encoder_dtype(device)).replace("torch.", ""), device)
            current = PromptEncoder(comps.path, device=device, dtype=text_encoder_dtype(device))
            self._prompt_encoder = current
        return current

    def release_prompt_encoder(self) -> None:
        """Free the text encoder if one is loaded."""
        current = getattr(self, "_prompt_encoder", None)
        if current is not None:
            current.close()
            self._prompt_encoder = None

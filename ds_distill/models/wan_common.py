"""Wan pieces the family, its adapter and its validator share (a leaf: imports none of them)."""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch

from ds_distill.models.components import ModelComponents
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


class PromptEncoderCache:
    """Keeps one text encoder loaded between users (start-up's negative prompt, the validation captions)."""

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


# ----------------------------------------------------------------------------------------------
# Wan2.2: two experts switched at a timestep boundary (A14B), per-token timesteps (TI2V-5B)

NUM_TRAIN_TIMESTEPS = 1000
EXPERTS = ("high", "low")
"""A two-expert role's experts: `high` is the pipeline's `transformer` (noisy half), `low` its `transformer_2`."""
EXPERT_FOLDERS = {"high": "transformer", "low": "transformer_2"}


def boundary_timestep(model_index: dict) -> float | None:
    """The shifted timestep at and above which a Wan2.2 A14B pipeline runs `transformer` (below it `transformer_2`):
    `boundary_ratio * 1000`, as WanPipeline compares it with its scheduler's timesteps. None for one transformer."""
    ratio = model_index.get("boundary_ratio")
    second = model_index.get("transformer_2")
    if ratio is None or not isinstance(second, list) or not second or second[0] is None:
        return None
    return float(ratio) * NUM_TRAIN_TIMESTEPS


def expands_timesteps(model_index: dict) -> bool:
    """Whether the pipeline hands the transformer one timestep per latent token (Wan2.2 TI2V-5B)."""
    return bool(model_index.get("expand_timesteps", False))


def timestep_fn(model_index: dict):
    """The plain denoiser's `timestep` input from t [B] and latents x (see `samplers.denoiser_from_module`): None
    (t itself), or for a pipeline with `expand_timesteps` (TI2V-5B) one per token, as `timestep_input` makes it."""
    return partial(timestep_input, expand=True) if expands_timesteps(model_index) else None


def timestep_input(t: torch.Tensor, x: torch.Tensor, expand: bool) -> torch.Tensor:
    """The transformer's `timestep` for latents x [B, C, T, H, W]: t [B] itself, or with `expand` one per token
    [B, T * H/2 * W/2] (text-to-video: every token at t), the tensor WanPipeline builds for TI2V-5B."""
    if not expand:
        return t
    tokens = x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2)
    return t.reshape(-1, 1).expand(x.shape[0], tokens)


class WanExperts(torch.nn.Module):
    """Wan2.2 A14B's two transformers as one module, so a two-expert role is one role with one DeepSpeed engine.

    Each sample goes to the expert of its timestep, as WanPipeline switches: `high` (its `transformer`) at shifted
    timesteps >= `boundary`, `low` (`transformer_2`) below. A batch mixing both is split and recombined.
    ZeRO-3 gathers an expert's weights collectively, so every rank must call the same experts: ranks agree (one
    small all-reduce) on which experts any rank needs, and a rank with no sample for such an expert runs it on a
    throwaway sample whose output enters the result times zero (so backward reduces gradients on every rank too).

    `trained` names the experts that train; the others stay frozen whatever `requires_grad_` / `train` set on the
    whole module (so the optimizer never sees them and checkpoints leave them out).
    """

    def __init__(self, high: torch.nn.Module, low: torch.nn.Module, boundary: float,
                 trained: tuple[str, ...] = EXPERTS):
        super().__init__()
        self.high = high
        self.low = low
        self.boundary = float(boundary)
        self.trained = tuple(trained)

    @property
    def config(self):
        """The high-noise expert's config (both experts share their architecture)."""
        return self.high.config

    def expert_range(self, name: str) -> tuple[float, float]:
        """Shifted timesteps [lo, hi] an expert serves (the low expert's hi is just below the boundary)."""
        if name == "high":
            return self.boundary, float(NUM_TRAIN_TIMESTEPS)
        return 0.0, float(torch.nextafter(torch.tensor(self.boundary), torch.tensor(0.0)))

    @property
    def trained_timesteps(self) -> tuple[float, float] | None:
        """The range of the one trained expert; None when both train (or none)."""
        return self.expert_range(self.trained[0]) if len(self.trained) == 1 else None

    def requires_grad_(self, requires_grad: bool = True):
        super().requires_grad_(requires_grad)
        for name in EXPERTS:
            if name not in self.trained:
                getattr(self, name).requires_grad_(False)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        for name in EXPERTS:
            if name not in self.trained:
                getattr(self, name).eval()
        return self

    def enable_gradient_checkpointing(self) -> None:
        """Activation checkpointing in the experts that train."""
        for name in self.trained:
            getattr(self, name).enable_gradient_checkpointing()

    def _needed(self, is_high: torch.Tensor) -> list[bool]:
        from ds_distill.engines import any_rank

        return any_rank(torch.stack([is_high.any(), (~is_high).any()]))

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                return_dict: bool = False, **kwargs):
        batch = hidden_states.shape[0]
        t = timestep.reshape(batch, -1)[:, 0] if timestep.dim() > 0 else timestep.expand(batch)
        is_high = t >= self.boundary
        out, dead = None, []
        for (name, mask), needed in zip((("high", is_high), ("low", ~is_high)), self._needed(is_high)):
            if not needed:
                continue
            idx = mask.nonzero().flatten()
            throwaway = idx.numel() == 0
            if throwaway:
                idx = torch.zeros(1, dtype=torch.long, device=mask.device)
            part = idx.to(hidden_states.device)
            v = getattr(self, name)(hidden_states=hidden_states[part],
                                    timestep=timestep[part] if timestep.dim() > 0 else timestep,
                                    encoder_hidden_states=encoder_hidden_states[part], return_dict=False,
                                    **kwargs)[0]
            if throwaway:
                dead.append(v)
            elif idx.numel() == batch:
                out = v
            else:
                base = out if out is not None else v.new_zeros((batch, *v.shape[1:]))
                out = base.index_copy(0, part, v)
        for v in dead:
            out = out + 0.0 * v.sum()
        return (out,)


def load_plain_transformer(model_dir: str | Path, dtype: torch.dtype) -> torch.nn.Module:
    """A model directory's transformer for sampling outside DeepSpeed (`from_pretrained` in `dtype`): one
    WanTransformer3DModel, or for a Wan2.2 A14B directory both experts in a `WanExperts`."""
    import json

    from diffusers import WanTransformer3DModel

    from ds_distill.models.components import transformer_dir

    model_dir = Path(model_dir)
    index = model_dir / "model_index.json"
    boundary = boundary_timestep(json.loads(index.read_text())) if index.is_file() else None
    if boundary is None:
        return WanTransformer3DModel.from_pretrained(str(transformer_dir(model_dir)), torch_dtype=dtype)
    experts = {name: WanTransformer3DModel.from_pretrained(str(model_dir / folder), torch_dtype=dtype)
               for name, folder in EXPERT_FOLDERS.items()}
    return WanExperts(experts["high"], experts["low"], boundary)

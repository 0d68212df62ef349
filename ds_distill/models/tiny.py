"""`ds-distill make-tiny-wan OUT`: a complete, tiny, randomly initialised Wan directory, made offline.

The directory has the layout of `Wan-AI/Wan2.1-T2V-1.3B-Diffusers` (transformer/, vae/, text_encoder/,
tokenizer/, scheduler/, model_index.json), so `diffusers.WanPipeline.from_pretrained(OUT)` loads and runs it.
Tests and the demo use it in place of the real weights, which nothing here may download. `--variant` picks the
model it mimics:

- `wan2.1` (default): Wan2.1 T2V, a 4-channel latent (8x spatial, 4x temporal compression);
- `wan2.2-5b`: Wan2.2 TI2V-5B, the 48-channel residual VAE with 16x spatial compression, `expand_timesteps`;
- `wan2.2-a14b`: Wan2.2 T2V A14B, two transformers (`transformer` for high noise, `transformer_2` for low noise,
  different weights) switched at `boundary_ratio` 0.875.

An existing non-empty OUT is refused unless `--overwrite`, which replaces only a model folder (one with
model_index.json): the new model is written beside it and swapped in when complete, so no old file survives.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from ds_distill.cli import ArgumentParser, check_output_dir, write_aside_then_swap
from ds_distill.errors import UserError, exit_on_user_error
from ds_distill.utils.toy_data import TOY_CAPTIONS

# Words the tiny tokenizer learns from; anything else still tokenizes (through <unk> and characters).
_TOKENIZER_CORPUS = TOY_CAPTIONS + [
    "a cat walking on a sunny street",
    "waves crashing on rocks at dusk",
    "a dog running through a green field",
    "a car driving at night in the rain",
    "Bright tones, overexposed, static, blurred details, subtitles, worst quality, low quality",
]


@dataclass
class TinyWanConfig:
    """Sizes of the tiny Wan; defaults give a ~0.3M-parameter transformer that learns the toy data in minutes."""

    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 16
    ffn_dim: int = 256
    latent_channels: int = 4
    text_dim: int = 32
    text_layers: int = 1
    vae_base_dim: int = 8
    flow_shift: float = 3.0
    seed: int = 0


def build_tokenizer():
    """A Unigram tokenizer trained offline on a few sentences, wrapped as the T5 tokenizer Wan uses."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=128, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(_TOKENIZER_CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)


def build_tiny_transformer(cfg: TinyWanConfig):
    """The tiny `WanTransformer3DModel` (randomly initialised from the current torch seed)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        text_dim=cfg.text_dim,
        freq_dim=32,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        rope_max_seq_len=32,
    )


def is_model_dir(path: Path) -> bool:
    """A Diffusers pipeline folder (what make-tiny-wan writes), the only kind --overwrite replaces."""
    return (path / "model_index.json").is_file()


# Config fields with a command-line flag, so a bad value is reported under the name the user typed.
_FLAGS = {"num_layers": "--layers", "num_attention_heads": "--heads", "attention_head_dim": "--head-dim",
          "ffn_dim": "--ffn-dim"}


def check_config(cfg: TinyWanConfig) -> None:
    """Sizes must be at least 1 and the flow shift a positive number."""
    for f in fields(cfg):
        value, name = getattr(cfg, f.name), _FLAGS.get(f.name, f.name)
        if f.name == "flow_shift":
            if not 0 < value < float("inf"):
                raise UserError(f"{name} {value}: must be a positive number")
        elif f.name != "seed" and value < 1:
            raise UserError(f"{name} {value}: must be at least 1")
    if cfg.attention_head_dim % 2:
        raise UserError(f"--head-dim {cfg.attention_head_dim}: must be even (the rotary embedding rotates channel "
                        "pairs)")


VARIANTS = ("wan2.1", "wan2.2-5b", "wan2.2-a14b")
TINY_BOUNDARY_RATIO = 0.875
"""Wan2.2 T2V A14B's switch (model_index.json `boundary_ratio`)."""
TINY_5B_CHANNELS = 48


def make_tiny_wan(out_dir: str | Path, cfg: TinyWanConfig | None = None, overwrite: bool = False,
                  variant: str = "wan2.1") -> Path:
    """Write a tiny Wan pipeline directory of `variant` (see `VARIANTS`) and return its path (see the module
    docstring for OUT). The 5B variant sets the latent channels to 48 whatever `cfg` says."""
    cfg = cfg or TinyWanConfig()
    if variant not in VARIANTS:
        raise UserError(f"--variant {variant}: must be one of {', '.join(VARIANTS)}")
    if variant == "wan2.2-5b":
        cfg = replace(cfg, latent_channels=TINY_5B_CHANNELS)
    check_config(cfg)
    out = check_output_dir(out_dir, "make-tiny-wan OUT", overwrite, swap=True, replaceable=is_model_dir,
                           what="a model folder (one with model_index.json)")
    with write_aside_then_swap(out) as new:
        _write_pipeline(new, cfg, variant)
    return out


def build_tiny_vae(cfg: TinyWanConfig, variant: str):
    """The tiny `AutoencoderKLWan`: Wan2.1's layout, or for `wan2.2-5b` the residual VAE that folds 2x2 pixels into
    12 input channels (16x spatial compression in all). Non-trivial per-channel statistics, so latent normalisation
    is exercised, not an identity."""
    from diffusers import AutoencoderKLWan

    c = cfg.latent_channels
    stats = dict(latents_mean=[round(0.1 * (i - c / 2), 3) for i in range(c)],
                 latents_std=[round(0.6 + 0.2 * (i % 8), 3) for i in range(c)])
    if variant == "wan2.2-5b":
        return AutoencoderKLWan(base_dim=cfg.vae_base_dim, z_dim=c, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                                out_channels=12, patch_size=2, scale_factor_spatial=16, **stats)
    return AutoencoderKLWan(base_dim=cfg.vae_base_dim, z_dim=c, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], **stats)


def _write_pipeline(out: Path, cfg: TinyWanConfig, variant: str = "wan2.1") -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=cfg.text_dim,
            d_kv=8,
            d_ff=2 * cfg.text_dim,
            num_layers=cfg.text_layers,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    vae = build_tiny_vae(cfg, variant)
    extra = {}
    if variant == "wan2.2-a14b":
        extra = dict(transformer_2=build_tiny_transformer(cfg), boundary_ratio=TINY_BOUNDARY_RATIO)
    elif variant == "wan2.2-5b":
        extra = dict(expand_timesteps=True)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        transformer=build_tiny_transformer(cfg),
        vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg.flow_shift),
        **extra,
    )
    pipe.save_pretrained(out)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """CLI: ds-distill make-tiny-wan OUT [--variant V] [--layers N] [--seed S] [--overwrite]."""
    parser = ArgumentParser(prog="ds-distill make-tiny-wan", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output directory (refused when not empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing model folder (the new one is swapped in when complete)")
    parser.add_argument("--variant", choices=VARIANTS, default="wan2.1",
                        help="the model it mimics: Wan2.1 T2V, Wan2.2 TI2V-5B or Wan2.2 T2V A14B (two experts)")
    parser.add_argument("--layers", type=int, default=TinyWanConfig.num_layers)
    parser.add_argument("--heads", type=int, default=TinyWanConfig.num_attention_heads)
    parser.add_argument("--head-dim", type=int, default=TinyWanConfig.attention_head_dim)
    parser.add_argument("--ffn-dim", type=int, default=TinyWanConfig.ffn_dim)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = TinyWanConfig(
        num_layers=args.layers,
        num_attention_heads=args.heads,
        attention_head_dim=args.head_dim,
        ffn_dim=args.ffn_dim,
        seed=args.seed,
    )
    out = make_tiny_wan(args.out, cfg, overwrite=args.overwrite, variant=args.variant)
    print(f"tiny {args.variant} written to {out}")
    return 0

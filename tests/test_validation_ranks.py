"""What start-up and validation load, and where: the text encoder once (start-up's negative prompt and the
validation captions share it, then it is freed), the VAE only while a validation run decodes."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import finetune_recipe, write_recipe
from test_validation import PROMPTS, build_finetune, write_prompts


class LoadCounter:
    """Counts real `from_pretrained` calls of a class (the call goes through unchanged)."""

    def __init__(self, monkeypatch, cls):
        self.calls = 0
        original = cls.from_pretrained.__func__

        def counted(klass, *args, **kwargs):
            self.calls += 1
            return original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(counted))


def test_text_encoder_dtype_per_device():
    from ds_distill.models.wan_common import text_encoder_dtype

    assert text_encoder_dtype("cpu") == torch.float32
    assert text_encoder_dtype(torch.device("cuda", 1)) == torch.bfloat16


def test_text_encoder_loaded_once_and_vae_only_while_validating(tiny_wan, toy_data, tmp_path, dist_env,
                                                                monkeypatch):
    """Start-up (negative prompt) and validator (captions) as train.py builds them: one text-encoder load, none
    held afterwards; every validation run loads the VAE once and keeps nothing."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5EncoderModel

    from ds_distill.engines import Strategy
    from ds_distill.models.wan_common import PromptEncoder

    text_loads = LoadCounter(monkeypatch, UMT5EncoderModel)
    vae_loads = LoadCounter(monkeypatch, AutoencoderKLWan)
    prompts = write_prompts(tmp_path / "prompts.json", PROMPTS[:2])
    runtime, validator = build_finetune(tiny_wan, toy_data, tmp_path, Strategy(dist_env),
                                        validation_dataset_file=str(prompts), validation_sampling_steps=1)
    assert text_loads.calls == 1
    assert runtime.family._prompt_encoder is None  # released once the captions were encoded
    assert vae_loads.calls == 0

    # The shared load gives what a fresh encoder gives (fp32 on the CPU), for both uses.
    fresh = PromptEncoder(tiny_wan)
    negative, caption = fresh([runtime.recipe.training.negative_prompt, PROMPTS[0]["caption"]], 16)
    torch.testing.assert_close(runtime.adapter.uncond_embedding[: negative.shape[0]], negative, rtol=0, atol=0)
    torch.testing.assert_close(validator.prompts[0].embedding, caption, rtol=0, atol=0)

    for step, loads in ((0, 1), (1, 2)):
        written = validator.run(runtime.method, step)
        assert vae_loads.calls == loads and len(written) == 2
        assert not hasattr(validator, "decoder")
        manifest = json.loads((tmp_path / "run" / "validation" / f"step-{step}" / "manifest.json").read_text())
        assert [v["rank"] for v in manifest["videos"]] == [0, 0]

    # A rank whose decoding fails (here: out of memory) is reported by every rank instead of leaving the others
    # waiting in the manifest's gather.
    from ds_distill.validators.wan import WanDecoder

    def out_of_memory(self, latents):
        raise MemoryError("cannot allocate the VAE's activations")

    monkeypatch.setattr(WanDecoder, "decode", out_of_memory)
    with pytest.raises(RuntimeError, match="validation at step 2: decoding videos failed on rank 0: MemoryError"):
        validator.run(runtime.method, 2)


def test_no_validation_frees_the_encoder_at_start_up(tiny_wan, toy_data, tmp_path, dist_env):
    from ds_distill.dispatch import build_runtime, check_recipe
    from ds_distill.engines import Strategy
    from ds_distill.utils.config import load_recipe

    recipe = finetune_recipe(tiny_wan, toy_data, tmp_path / "run", max_train_steps=1)
    checked = check_recipe(load_recipe(write_recipe(tmp_path / "recipe.yaml", recipe)))
    runtime = build_runtime(checked, Strategy(dist_env))
    assert runtime.adapter.uncond_embedding.abs().sum() > 0  # the encoded negative prompt
    assert runtime.family._prompt_encoder is None

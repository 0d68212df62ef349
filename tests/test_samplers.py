"""The sampling loops on the tiny Wan: ODE == diffusers.WanPipeline, SDE == a hand-written loop, step by step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ds_distill.samplers import (
    denoiser_from_module,
    even_raw_timesteps,
    initial_noise,
    sample_latents,
    sde_sample,
    sde_timesteps,
)

PROMPT = "a red ball bouncing on the floor"
NEGATIVE = "worst quality, low quality"
TEXT_LEN = 16
SIZE = {"height": 64, "width": 64, "num_frames": 5}
SHAPE = (1, 4, 2, 8, 8)  # latents of 5 frames at 64x64 under the tiny Wan VAE
FLOW_SHIFT = 3.0




@pytest.fixture(scope="module")
def pipe(tiny_wan):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(tiny_wan))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def conds(tiny_wan):
    """Conditional and unconditional embeddings [1, TEXT_LEN, D], zero-padded as WanPipeline pads them."""
    from ds_distill.models.wan_common import PromptEncoder
    from ds_distill.validators.prompts import pad_embedding

    cond, uncond = PromptEncoder(tiny_wan)([PROMPT, NEGATIVE], TEXT_LEN)
    return pad_embedding(cond, TEXT_LEN)[None], pad_embedding(uncond, TEXT_LEN)[None]


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_ode_matches_wan_pipeline(pipe, conds, tiny_wan, guidance):
    cond, uncond = conds
    call = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=guidance,
                max_sequence_length=TEXT_LEN, **SIZE)
    ref = pipe(**call, generator=torch.Generator().manual_seed(11), output_type="latent").frames

    gen = torch.Generator().manual_seed(11)
    noise = initial_noise(SHAPE, gen, "cpu")
    seen_t = []
    ours = sample_latents(
        "ode", denoiser_from_module(pipe.transformer), noise, cond, uncond=uncond, guidance_scale=guidance,
        flow_shift=FLOW_SHIFT, generator=gen, num_steps=4, scheduler_config=dict(pipe.scheduler.config),
        callback=lambda i, t, x0, x: seen_t.append(float(t[0])),
    )
    assert ours.shape == ref.shape == SHAPE
    torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=1e-5)
    assert (ours - noise).abs().mean() > 0.1  # it really integrated
    pipe.scheduler.set_timesteps(4)
    assert seen_t == pytest.approx(pipe.scheduler.timesteps.tolist())

    if guidance > 1:  # decoded frames too, through our decoder (the one validation and the CLI use)
        from ds_distill.validators.wan import WanDecoder

        ref_frames = pipe(**call, generator=torch.Generator().manual_seed(11), output_type="np").frames
        frames = WanDecoder(tiny_wan).decode(ours)
        assert frames.shape == ref_frames.shape == (1, 5, 64, 64, 3)
        np.testing.assert_allclose(frames, ref_frames, atol=1e-4)


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_sde_matches_hand_written_loop(pipe, conds, guidance):
    cond, uncond = conds
    model = pipe.transformer
    raw = [1000, 750, 500, 250]
    record = []
    gen = torch.Generator().manual_seed(5)
    out = sde_sample(
        denoiser_from_module(model), initial_noise(SHAPE, gen, "cpu"), cond,
        raw_timesteps=raw, flow_shift=FLOW_SHIFT, generator=gen, guidance_scale=guidance, uncond=uncond,
        callback=lambda i, t, x0, x: record.append((t.clone(), x0.clone(), x.clone())),
    )
    assert len(record) == len(raw)

    def velocity(x, t, c):
        return model(hidden_states=x, timestep=t, encoder_hidden_states=c, return_dict=False)[0]

    g = torch.Generator().manual_seed(5)
    x = torch.randn(SHAPE, generator=g)
    sigmas = [FLOW_SHIFT * (r / 1000) / (1 + (FLOW_SHIFT - 1) * r / 1000) for r in raw]
    with torch.no_grad():
        for i, sigma in enumerate(sigmas):
            t = torch.tensor([1000.0 * sigma])
            v = velocity(x, t, cond)
            if guidance > 1:
                v_u = velocity(x, t, uncond)
                v = v_u + guidance * (v - v_u)
            x0 = x - sigma * v
            t_i, x0_i, x_i = record[i]
            torch.testing.assert_close(t_i, t, atol=1e-3, rtol=0)
            torch.testing.assert_close(x0_i, x0, atol=1e-5, rtol=1e-5)
            if i + 1 < len(sigmas):
                eps = torch.randn(SHAPE, generator=g)
                x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * eps
                torch.testing.assert_close(x_i, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)


def test_sde_is_reproducible_from_the_seed(pipe, conds):
    cond, _ = conds
    den = denoiser_from_module(pipe.transformer)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return sample_latents("sde", den, initial_noise(SHAPE, g, "cpu"), cond, flow_shift=FLOW_SHIFT,
                              generator=g, raw_timesteps=[1000, 500])

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_sde_timesteps_are_shifted_raw_timesteps():
    # sigma = S u / (1 + (S - 1) u) with S = 3: u = 1, .75, .5, .25 -> 1, .9, .75, .5
    ts = sde_timesteps([1000, 750, 500, 250], FLOW_SHIFT)
    torch.testing.assert_close(ts, torch.tensor([1000.0, 900.0, 750.0, 500.0]))
    assert even_raw_timesteps(4) == [1000.0, 750.0, 500.0, 250.0]
    # the ODE loop given explicit raw timesteps shifts them the same way (through the scheduler)
    seen = []
    g = torch.Generator().manual_seed(0)
    sample_latents("ode", lambda x, t, c: torch.ones_like(x), initial_noise(SHAPE, g, "cpu"), torch.zeros(1, 4, 8),
                   flow_shift=FLOW_SHIFT, generator=g, raw_timesteps=[1000, 750, 500, 250],
                   callback=lambda i, t, x0, x: seen.append(float(t[0])))
    assert seen == pytest.approx(ts.tolist())
    for bad in ([], [500, 750], [1000, 0], [1200, 500], [500, 500]):
        with pytest.raises(ValueError):
            sde_timesteps(bad, FLOW_SHIFT)


def test_unknown_sampler_kind_is_refused():
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="unknown sampler kind 'euler'.*ode, sde"):
        sample_latents("euler", lambda x, t, c: x, x, torch.zeros(1, 4, 8), flow_shift=3.0,
                       generator=torch.Generator())

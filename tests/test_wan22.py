"""Wan2.2 on the tiny builders: TI2V-5B (48-channel VAE, per-token timesteps) and A14B (two experts switched at
`boundary_ratio`), sampled as WanPipeline samples them, finetuned and DMD2-distilled on 1 and 2 ranks, exported."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import INFERENCE_T0, deepspeed_cmd, dmd2_recipe, finetune_recipe, run_cli, write_recipe

PROMPT = "a red ball bouncing on the floor"
NEGATIVE = "worst quality, low quality"
TEXT_LEN = 16
SIZE = {"height": 32, "width": 32, "num_frames": 5}
FLOW_SHIFT = 3.0


@pytest.fixture(scope="module")
def wan22(tmp_path_factory):
    """{variant: {role: tiny model dir}}: the 5B and A14B variants, one model per role (seeds 1, 2, 3)."""
    from ds_distill.models.tiny import TinyWanConfig, make_tiny_wan

    root = tmp_path_factory.mktemp("wan22")
    return {v: {role: make_tiny_wan(root / v / role, TinyWanConfig(seed=seed), variant=v)
                for role, seed in (("student", 1), ("teacher", 2), ("critic", 3))}
            for v in ("wan2.2-5b", "wan2.2-a14b")}


@pytest.fixture(scope="module")
def toy_5b(wan22, tmp_path_factory):
    """Toy data in the 5B's 48-channel latent space (text embeddings from its tiny encoder)."""
    from ds_distill.utils.toy_data import ToyDataConfig, make_toy_data

    return make_toy_data(tmp_path_factory.mktemp("toy5b") / "toy", wan22["wan2.2-5b"]["teacher"],
                         ToyDataConfig(rows_per_caption=4))


def _expert_calls(module) -> dict[str, list[float]]:
    """Record the timesteps each expert of a WanExperts runs at (forward pre-hooks)."""
    seen: dict[str, list[float]] = {"high": [], "low": []}
    for name in seen:
        getattr(module, name).register_forward_pre_hook(
            lambda _m, _a, kw, name=name: seen[name].append(float(kw["timestep"].flatten()[0])), with_kwargs=True)
    return seen


@pytest.mark.parametrize("variant", ["wan2.2-a14b", "wan2.2-5b"])
def test_ode_matches_wan_pipeline(wan22, dist_env, variant):
    """Our ODE loop == WanPipeline's latents (and decoded frames), over the plain transformer(s) `ds-distill sample`
    loads and over the ZeRO-3 role (threshold 0) through the adapter, as validation runs it; A14B: with the switch."""
    from diffusers import WanPipeline

    from ds_distill.engines import Strategy, eval_ds_config, load_template
    from ds_distill.models.components import read_components
    from ds_distill.models.wan import WanFamily
    from ds_distill.models.wan_common import PromptEncoder
    from ds_distill.roles import RoleHandle
    from ds_distill.samplers import denoiser_from_module, initial_noise, sample_latents
    from ds_distill.utils.config import recipe_from_mapping
    from ds_distill.validators.prompts import pad_embedding
    from ds_distill.validators.wan import WanDecoder

    model = wan22[variant]["teacher"]
    pipe = WanPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    steps, guidance = 6, 3.0
    call = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance,
                max_sequence_length=TEXT_LEN, **SIZE)
    ref = pipe(**call, generator=torch.Generator().manual_seed(7), output_type="latent").frames
    cond, uncond = (pad_embedding(e, TEXT_LEN)[None] for e in PromptEncoder(model)([PROMPT, NEGATIVE], TEXT_LEN))
    comps = read_components(model)
    timestep_fn = WanFamily.timestep_fn(comps.model_index)
    assert (timestep_fn is not None) == (variant == "wan2.2-5b")
    shape = (1, 48, 2, 2, 2) if variant == "wan2.2-5b" else (1, 4, 2, 4, 4)

    def ours(denoiser):
        gen = torch.Generator().manual_seed(7)
        return sample_latents("ode", denoiser, initial_noise(shape, gen, "cpu"), cond, uncond=uncond,
                              guidance_scale=guidance, flow_shift=FLOW_SHIFT, generator=gen, num_steps=steps,
                              scheduler_config=dict(pipe.scheduler.config))

    plain = WanFamily.load_plain_module(model, torch.float32)
    seen = _expert_calls(plain) if variant == "wan2.2-a14b" else None
    out = ours(denoiser_from_module(plain, torch.float32, timestep_fn=timestep_fn))
    assert out.shape == ref.shape == shape
    torch.testing.assert_close(out, ref.float(), atol=1e-5, rtol=1e-5)
    if seen is not None:  # both experts ran, each on its side of boundary_ratio * 1000 (cond + uncond per step)
        assert seen["high"] and seen["low"]
        assert min(seen["high"]) >= 875.0 > max(seen["low"])
        assert len(seen["high"]) + len(seen["low"]) == 2 * steps

    # The ZeRO-3 role (partitioned, threshold 0) through the adapter: what validation samples with.
    recipe = recipe_from_mapping(finetune_recipe(model, model, model / "unused", mixed_precision="fp32"), "r.yaml")
    strategy = Strategy(dist_env)
    cfg = eval_ds_config(load_template(str(INFERENCE_T0), "r.yaml", "ds_config"), micro_batch=1, world_size=1,
                         precision="fp32", offload="none", nvme_path=None)
    family = WanFamily()
    module = family.load_transformer(comps, strategy, cfg, trainable=False)
    role = RoleHandle("teacher", module, False, strategy.init_frozen(module, cfg))
    assert all(p.data.numel() == 0 for p in module.parameters()), "threshold 0: every tensor partitioned"
    adapter = family.build_adapter(comps, recipe.pipeline_config, recipe.training, dist_env.device)
    with torch.no_grad():
        out_zero = ours(lambda x, t, c: adapter.predict_noise(role, x, t, c))
    torch.testing.assert_close(out_zero, ref.float(), atol=1e-5, rtol=1e-5)

    frames_ref = pipe(**call, generator=torch.Generator().manual_seed(7), output_type="np").frames
    frames = WanDecoder(model).decode(out)
    assert frames.shape == frames_ref.shape == (1, 5, 32, 32, 3)
    np.testing.assert_allclose(frames, frames_ref, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Training: one role holding both experts, one expert trained, the other bit-equal


def whole(module) -> dict[str, torch.Tensor]:
    """Every parameter of a ZeRO-3 module, gathered (collective; one rank here)."""
    import deepspeed

    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items()}


def expert_file(model_dir, expert: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from ds_distill.models.wan_common import EXPERT_FOLDERS

    return load_file(str(model_dir / EXPERT_FOLDERS[expert] / "diffusion_pytorch_model.safetensors"))


def assert_expert_is_file(weights: dict[str, torch.Tensor], expert: str, model_dir, equal: bool) -> None:
    """The gathered `expert.*` weights bit-equal to (equal=True) or, every tensor that trains, different from the
    expert's weights on disk."""
    disk = expert_file(model_dir, expert)
    mine = {n.split(".", 1)[1]: t for n, t in weights.items() if n.startswith(expert + ".")}
    assert mine.keys() == disk.keys()
    same = [n for n in disk if torch.equal(mine[n], disk[n].to(mine[n].dtype))]
    if equal:
        assert len(same) == len(disk)
    else:
        assert len(same) < len(disk) // 10, same


def a14b_recipe(wan22, toy_data, out, method: str, experts: list[str] | None, **training) -> dict:
    """Finetune (student) or DMD2 (student, teacher, critic: different weights) over the tiny A14B."""
    models = wan22["wan2.2-a14b"]
    if method == "finetune":
        r = finetune_recipe(models["student"], toy_data, out, **training)
    else:
        r = dmd2_recipe(models["teacher"], toy_data, out, **training)
        for role in ("student", "critic"):
            r["roles"][role]["path"] = str(models[role])
        if experts is not None:
            r["roles"]["critic"]["experts"] = list(experts)
    if experts is not None:
        r["roles"]["student"]["experts"] = list(experts)
    return r


def test_a14b_low_expert_finetune_leaves_high_bit_equal(wan22, toy_data, dist_env, tmp_path):
    """Finetune, fp32, 1 rank in process, threshold 0, checkpointing on, `experts: [low]`: one engine holds both
    experts; the high expert has no grads (outside the optimizer, out of the checkpoint) and is bit-equal to its file
    after training; the low expert moved. Preflight accepts the checkpoint for --resume (its names are `low.*`).
    Export: transformer_2/ trained, transformer/ the base's; WanPipeline renders."""
    from diffusers import WanPipeline

    from conftest import build_in_process
    from ds_distill import export
    from ds_distill.models.wan_common import WanExperts
    from ds_distill.trainer import Trainer

    model = wan22["wan2.2-a14b"]["student"]
    recipe = write_recipe(tmp_path / "r.yaml", a14b_recipe(wan22, toy_data, tmp_path / "run", "finetune", ["low"],
                                                            max_train_steps=2, gradient_checkpointing=True,
                                                            trackers=[]))
    runtime, dataset, out = build_in_process(recipe, dist_env)
    student = runtime.bundle["student"]
    assert isinstance(student.module, WanExperts)
    assert {n.split(".")[0] for n, p in student.module.named_parameters() if p.requires_grad} == {"low"}
    assert all(p.data.numel() == 0 for p in student.module.parameters()), "threshold 0: every tensor partitioned"
    Trainer(runtime, dataset).train()
    after = whole(student.module)
    assert_expert_is_file(after, "high", model, equal=True)
    assert_expert_is_file(after, "low", model, equal=False)

    states = torch.load(next((out / "checkpoint-2" / "student").glob("*model_states.pt")), map_location="cpu",
                        weights_only=False)
    assert {k.split(".")[0] for g in states["param_shapes"] for k in g} == {"low"}
    from ds_distill import preflight
    from ds_distill.utils.config import load_recipe

    assert preflight.check_resume(out, "latest", load_recipe(recipe), runtime.components)[0] == out / "checkpoint-2"
    dst = tmp_path / "export"
    export.convert(out, dst, base=model, log=lambda *_: None)
    assert (dst / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (model / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    from safetensors.torch import load_file

    exported = load_file(str(dst / "transformer_2" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(exported[n.split(".", 1)[1]], t) for n, t in after.items() if n.startswith("low."))
    assert json.loads((dst / "model_index.json").read_text())["boundary_ratio"] == 0.875
    pipe = WanPipeline.from_pretrained(str(dst))
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(prompt=PROMPT, num_inference_steps=4, guidance_scale=1.0, max_sequence_length=TEXT_LEN,
                  output_type="np", generator=torch.Generator().manual_seed(0), **SIZE).frames
    assert frames.shape == (1, 5, 32, 32, 3) and np.isfinite(frames).all() and frames.std() > 0


def test_a14b_high_expert_dmd2_scores_in_its_range(wan22, toy_data, dist_env, tmp_path):
    """DMD2, fp32, 1 rank in process, threshold 0, student and critic `experts: [high]`, teacher both: score
    timesteps fall in the high expert's range [875, max_timestep_ratio * 1000], the student exits only at its own
    steps, training runs, and the low experts of student and critic stay bit-equal to their files."""
    from conftest import build_in_process
    from ds_distill.trainer import Trainer

    models = wan22["wan2.2-a14b"]
    recipe = write_recipe(tmp_path / "r.yaml", a14b_recipe(wan22, toy_data, tmp_path / "run", "dmd2", ["high"],
                                                            max_train_steps=2, train_batch_size=2, trackers=[]))
    runtime, dataset, out = build_in_process(recipe, dist_env)
    method = runtime.method
    # [1000, 750, 500, 250] shifted by 3: 1000, 900, 750, 500 -> only the first two are the high expert's
    assert method.exit_steps == [0, 1]
    from ds_distill.adapters.base import TrainingBatch

    n = 512  # score timesteps depend only on the sample ids; the rest of the batch is a placeholder
    ids = torch.arange(n)
    batch = TrainingBatch(None, (4, 2, 4, 4), torch.zeros(n, 1, 1), torch.ones(n, 1), torch.zeros(n, 1, 1), ids)
    t = method.score_timesteps(batch, "score_timestep")
    assert t.min() >= 875.0 and t.max() <= 980.0 and t.max() - t.min() > 80.0
    Trainer(runtime, dataset).train()
    for role in ("student", "critic"):
        after = whole(runtime.bundle[role].module)
        assert_expert_is_file(after, "low", models[role], equal=True)
        assert_expert_is_file(after, "high", models[role], equal=False)
    teacher = whole(runtime.bundle["teacher"].module)
    for expert in ("high", "low"):
        assert_expert_is_file(teacher, expert, models["teacher"], equal=True)


def test_5b_finetune_and_dmd2_one_rank(wan22, toy_5b, dist_env, tmp_path):
    """TI2V-5B (48 latent channels, 16x VAE, per-token timesteps), 1 rank in process, threshold 0: a bf16 finetune on
    48-channel toy latents and an fp32 DMD2 (three roles, different weights) both train; the student's export loads
    in WanPipeline and renders."""
    from diffusers import WanPipeline

    from conftest import build_in_process
    from ds_distill import export
    from ds_distill.trainer import Trainer

    models = wan22["wan2.2-5b"]
    ft = finetune_recipe(models["student"], toy_5b, tmp_path / "ft", max_train_steps=2, mixed_precision="bf16",
                         gradient_checkpointing=True, trackers=[])
    runtime, dataset, out = build_in_process(write_recipe(tmp_path / "ft.yaml", ft), dist_env)
    assert runtime.adapter.sample_latent_shape == (48, 2, 2, 2) and runtime.adapter.expand_timesteps
    before = whole(runtime.bundle["student"].module)
    Trainer(runtime, dataset).train()
    after = whole(runtime.bundle["student"].module)
    assert sum(not torch.equal(before[n], after[n]) for n in before) > len(before) // 2

    r = dmd2_recipe(models["teacher"], toy_5b, tmp_path / "dmd2", max_train_steps=2, train_batch_size=2, trackers=[])
    for role in ("student", "critic"):
        r["roles"][role]["path"] = str(models[role])
    runtime, dataset, out = build_in_process(write_recipe(tmp_path / "dmd2.yaml", r), dist_env)
    Trainer(runtime, dataset).train()
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert metrics and all(np.isfinite(v) for m in metrics for k, v in m.items() if k.endswith("loss"))
    dst = tmp_path / "export"
    export.convert(out, dst, base=models["student"], log=lambda *_: None)
    pipe = WanPipeline.from_pretrained(str(dst))
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(prompt=PROMPT, num_inference_steps=2, guidance_scale=1.0, max_sequence_length=TEXT_LEN,
                  output_type="np", generator=torch.Generator().manual_seed(0), **SIZE).frames
    assert frames.shape == (1, 5, 32, 32, 3) and np.isfinite(frames).all() and frames.std() > 0


def test_a14b_dmd2_two_ranks_bf16_both_experts(wan22, toy_data, tmp_path):
    """bf16 DMD2 on 2 ranks (threshold 0, checkpointing on), both experts of student and critic training: score
    timesteps differ per rank, so ranks route samples to different experts (the throwaway-sample path). The export
    (--base) has both experts and boundary_ratio; WanPipeline renders it and `ds-distill sample` runs it."""
    from diffusers import WanPipeline

    from ds_distill import export, sample

    models = wan22["wan2.2-a14b"]
    r = a14b_recipe(wan22, toy_data, tmp_path / "run", "dmd2", None, max_train_steps=2, train_batch_size=1,
                    mixed_precision="bf16", gradient_checkpointing=True, checkpointing_steps=2, trackers=[])
    proc = run_cli(deepspeed_cmd(2, write_recipe(tmp_path / "r.yaml", r)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "run"
    dst = tmp_path / "export"
    export.convert(out, dst, base=models["student"], log=lambda *_: None)
    for expert, folder in (("high", "transformer"), ("low", "transformer_2")):
        from safetensors.torch import load_file

        trained = load_file(str(dst / folder / "diffusion_pytorch_model.safetensors"))
        base = expert_file(models["student"], expert)
        assert trained.keys() == base.keys()
        assert sum(torch.equal(trained[n], base[n]) for n in base) < len(base) // 10, expert
    assert json.loads((dst / "model_index.json").read_text())["boundary_ratio"] == 0.875
    pipe = WanPipeline.from_pretrained(str(dst))
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(prompt=PROMPT, num_inference_steps=4, guidance_scale=1.0, max_sequence_length=TEXT_LEN,
                  output_type="np", generator=torch.Generator().manual_seed(0), **SIZE).frames
    assert frames.shape == (1, 5, 32, 32, 3) and np.isfinite(frames).all()
    assert sample.main(["--model", str(dst), "--prompt", PROMPT, "--sampler", "ode", "--steps", "4",
                        "--num-frames", "5", "--height", "32", "--width", "32", "--text-len", str(TEXT_LEN),
                        "--output-dir", str(tmp_path / "videos")]) == 0
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 1


@pytest.mark.parametrize("name, experts, exits", [
    ("wan2.2_ti2v_5B_dmd2_4steps", None, None),
    ("wan2.2_t2v_A14B_dmd2_high", ["high"], [0, 1, 2]),
    ("wan2.2_t2v_A14B_dmd2_low", ["low"], [3])])
def test_shipped_wan22_recipes(name, experts, exits):
    """The shipped Wan2.2 recipes check offline; the A14B stages train one expert each (student and critic), and
    their warped steps put the exits as the comments say (shift 12: 1000, 973, 923 high; 800 low)."""
    from conftest import REPO
    from ds_distill.dispatch import check_recipe
    from ds_distill.utils.config import load_recipe

    checked = check_recipe(load_recipe(str(REPO / "recipes" / f"{name}.yaml")))
    roles = checked.recipe.roles
    assert roles["student"].experts == experts and roles["critic"].experts == experts
    assert roles["teacher"].experts is None
    cfg = checked.method_config
    assert len(cfg.dmd_denoising_steps) == 4 and cfg.warp_denoising_step
    if exits is not None:
        shift = checked.recipe.pipeline_config.flow_shift
        shifted = [1000 * shift * (t / 1000) / (1 + (shift - 1) * t / 1000) for t in cfg.dmd_denoising_steps]
        high = [i for i, t in enumerate(shifted) if t >= 875.0]
        assert (high if experts == ["high"] else [i for i in range(4) if i not in high]) == exits


def test_preflight_checkpoint_size_counts_every_trained_expert(wan22, toy_data, tmp_path):
    """Preflight's checkpoint size estimate (the free-space check) counts every expert the role trains, as the
    family reports them: both experts of the A14B by default, one with `experts: [low]`."""
    from ds_distill import preflight
    from ds_distill.models.wan import WanFamily
    from ds_distill.utils.config import recipe_from_mapping

    model = wan22["wan2.2-a14b"]["student"]
    numel = {e: preflight.transformer_numel(json.loads((model / folder / "config.json").read_text()))
             for e, folder in (("high", "transformer"), ("low", "transformer_2"))}

    def estimate(experts):
        recipe = recipe_from_mapping(a14b_recipe(wan22, toy_data, tmp_path / "o", "finetune", experts), "r.yaml")
        comps = {"student": WanFamily().components(str(model), "r.yaml", "roles.student.path")}
        per = 4 * 3 + (2 if recipe.training.mixed_precision == "bf16" else 4)  # fp32 master, Adam moments, weights
        return preflight.checkpoint_bytes(comps, recipe, ema=False), per

    got, per = estimate(["low"])
    assert got == int(numel["low"] * per * 1.1)
    got, per = estimate(None)
    assert got == int((numel["high"] + numel["low"]) * per * 1.1) and numel["high"] > 0


def test_bad_experts_are_one_line(wan22, tiny_wan, toy_data, tmp_path):
    """`experts` on a frozen role, an unknown expert, or on a model with one transformer: one line, exit 2."""
    from conftest import PYTHON

    cases = []
    r = a14b_recipe(wan22, toy_data, tmp_path / "o1", "dmd2", None)
    r["roles"]["teacher"]["experts"] = ["high"]
    cases.append((r, ["roles.teacher.experts:", "only a trainable role"]))
    r = a14b_recipe(wan22, toy_data, tmp_path / "o2", "finetune", ["middle"])
    cases.append((r, ["roles.student.experts:", "[high], [low]", "middle"]))
    r = finetune_recipe(tiny_wan, toy_data, tmp_path / "o3")
    r["roles"]["student"]["experts"] = ["high"]
    cases.append((r, ["roles.student.experts:", "one transformer"]))
    for i, (recipe, words) in enumerate(cases):
        out = tmp_path / f"o{i + 1}"
        res = run_cli([PYTHON, "-m", "ds_distill.train", "--config",
                       str(write_recipe(tmp_path / f"r{i}.yaml", recipe))])
        lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
        assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
        assert all(w in lines[0] for w in words), lines[0]
        assert not out.exists()


# ----------------------------------------------------------------------------------------------
# Slow: 2 ranks == 1 rank, and the 5B's DMD2 on 2 ranks

RANKS_ATOL = 3e-5
"""fp32 finetunes on 1 rank (batch 4) and 2 ranks (2 each) differ only in summation order (~1e-7 relative); Adam
turns that into weight differences far below one step (lr 1e-3). Adam divides each element's step by its own
gradient scale, so an element whose gradient is near zero carries the summation noise further: on one machine one
element of the A14B's 4096 in low-expert blocks.3.attn1.to_k moved by 1.19e-5 (the rest below 1e-5, as on another
machine). 3e-5 is 3% of one step; a wrong reduction or a dropped sample moves weights by a whole step."""


def exported(out, base, tmp) -> dict[str, torch.Tensor]:
    """{folder/name: tensor} of the newest checkpoint's export (both experts of an A14B)."""
    from safetensors.torch import load_file

    from ds_distill import export

    dst = tmp / f"export-{out.name}"
    export.convert(out, dst, base=base, log=lambda *_: None)
    return {f"{folder}/{k}": v for folder in ("transformer", "transformer_2") if (dst / folder).is_dir()
            for k, v in load_file(str(dst / folder / "diffusion_pytorch_model.safetensors")).items()}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["wan2.2-a14b", "wan2.2-5b"])
def test_finetune_two_ranks_equal_one_rank(wan22, toy_data, toy_5b, tmp_path, variant):
    """fp32 finetune, threshold 0, both experts of the A14B training: per-sample timesteps mix the experts inside a
    batch (split and recombined) and between ranks (throwaway samples); the 2-rank weights equal the 1-rank ones."""
    model = wan22[variant]["student"]
    data = toy_5b if variant == "wan2.2-5b" else toy_data
    outs = {}
    for nproc in (1, 2):
        out = tmp_path / f"ranks{nproc}"
        r = finetune_recipe(model, data, out, max_train_steps=3, train_batch_size=4 // nproc, checkpointing_steps=3,
                            trackers=[])
        path = write_recipe(tmp_path / f"r{nproc}.yaml", r)
        from conftest import train_cmd

        proc = run_cli(train_cmd(path) if nproc == 1 else deepspeed_cmd(2, path))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        outs[nproc] = exported(out, model, tmp_path)
    a, b = outs[1], outs[2]
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=RANKS_ATOL, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow
def test_5b_dmd2_two_ranks_bf16(wan22, toy_5b, tmp_path):
    """bf16 DMD2 on the 5B, 2 ranks, threshold 0, checkpointing on: runs, and the export renders in WanPipeline."""
    from diffusers import WanPipeline

    from ds_distill import export

    models = wan22["wan2.2-5b"]
    r = dmd2_recipe(models["teacher"], toy_5b, tmp_path / "run", max_train_steps=2, train_batch_size=1,
                    mixed_precision="bf16", gradient_checkpointing=True, checkpointing_steps=2, trackers=[])
    for role in ("student", "critic"):
        r["roles"][role]["path"] = str(models[role])
    proc = run_cli(deepspeed_cmd(2, write_recipe(tmp_path / "r.yaml", r)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    export.convert(tmp_path / "run", tmp_path / "export", base=models["student"], log=lambda *_: None)
    pipe = WanPipeline.from_pretrained(str(tmp_path / "export"))
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(prompt=PROMPT, num_inference_steps=2, guidance_scale=1.0, max_sequence_length=TEXT_LEN,
                  output_type="np", generator=torch.Generator().manual_seed(0), **SIZE).frames
    assert frames.shape == (1, 5, 32, 32, 3) and np.isfinite(frames).all()

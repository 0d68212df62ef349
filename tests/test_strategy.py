"""DeepSpeed wiring through `Strategy`: trainable templates at stage 3, gradient reduction dtype, whole-step skips
under gradient accumulation; and the method knobs that decide what the engines see (CFG dropout, DMD2 schedule)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import TRAIN_T0, deepspeed_cmd, dmd2_recipe, finetune_recipe, read_metrics, run_cli, write_recipe
from ds_distill.errors import RecipeError


def stage_template(tmp_path, stage: int | None):
    tpl = json.loads(TRAIN_T0.read_text())
    if stage is None:
        del tpl["zero_optimization"]
    else:
        tpl["zero_optimization"]["stage"] = stage
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps(tpl))
    return path, tpl


@pytest.mark.parametrize("stage", [2, None])
def test_trainable_template_below_stage_3_is_a_one_line_recipe_error(stage, tmp_path):
    from ds_distill.engines import load_template, train_ds_config

    path, tpl = stage_template(tmp_path, stage)
    source = str(tmp_path / "r.yaml")
    with pytest.raises(RecipeError) as err:
        load_template(str(path), source, "roles.critic.ds_config", trainable=True)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{source}: roles.critic.ds_config: {path}: zero_optimization.stage is {stage or 0};")
    assert "stage 3" in msg
    assert load_template(str(path), source, "roles.teacher.ds_config") == tpl  # frozen roles: forced to 3 later
    with pytest.raises(RecipeError, match=r"^r.yaml: training.ds_config: zero_optimization.stage is"):
        train_ds_config(tpl, micro_batch=1, grad_accum=1, world_size=1, precision="bf16", max_grad_norm=1.0,
                        where="r.yaml: training.ds_config")
    ok = json.loads(TRAIN_T0.read_text())
    assert load_template(str(TRAIN_T0), source, "training.ds_config", trainable=True) == ok


def test_stage_2_template_stops_the_run_before_anything_is_written(tiny_wan, toy_data, tmp_path, capsys):
    from ds_distill.train import main

    path, _ = stage_template(tmp_path, 2)
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", finetune_recipe(tiny_wan, toy_data, out, ds_config=str(path)))
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(["--config", str(recipe)]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: {recipe}: training.ds_config: {path}: zero_optimization.stage is 2;"), err
    assert not out.exists()


def test_grad_reduce_dtype_reaches_deepspeed_and_bf16_trains_with_it(tiny_wan, toy_data, dist_env, tmp_path):
    from ds_distill.engines import OptimizerSpec, Strategy, train_ds_config
    from ds_distill.models.wan import WanFamily
    from ds_distill.utils.config import load_recipe

    tpl = json.loads(TRAIN_T0.read_text())
    kw = dict(micro_batch=2, grad_accum=1, world_size=1, precision="bf16", max_grad_norm=1.0)
    assert train_ds_config(tpl, **kw)["communication_data_type"] == "fp32"  # the default
    assert train_ds_config(tpl, grad_reduce_dtype="bf16", **kw)["communication_data_type"] == "bf16"
    assert train_ds_config({**tpl, "communication_data_type": "bf16"}, **kw)["communication_data_type"] == "bf16"

    recipe = finetune_recipe(tiny_wan, toy_data, tmp_path / "out", grad_reduce_dtype="bf16")
    assert load_recipe(write_recipe(tmp_path / "a.yaml", recipe)).training.grad_reduce_dtype == "bf16"
    recipe["training"]["grad_reduce_dtype"] = "fp16"
    with pytest.raises(RecipeError, match="training.grad_reduce_dtype"):
        load_recipe(write_recipe(tmp_path / "b.yaml", recipe))

    # DeepSpeed's ZeRO-3 optimizer takes it: bf16 parameters, fp32 reduce-scatter; and the role trains.
    strategy = Strategy(dist_env)
    cfg = train_ds_config(tpl, **kw)
    family = WanFamily()
    comps = family.components(str(tiny_wan), "<test>", "path")
    module = family.load_transformer(comps, strategy, cfg)
    engine = strategy.init_trainable(module, cfg, OptimizerSpec(
        lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8, max_grad_norm=1.0, lr_scheduler="constant",
        warmup_steps=0, total_steps=10))
    assert engine.communication_data_type == torch.float32
    assert engine.optimizer.communication_data_type == torch.float32
    assert next(module.parameters()).dtype == torch.bfloat16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 2, 8, 8, generator=g).bfloat16()
    c = torch.randn(2, 8, 32, generator=g).bfloat16()
    losses = []
    for _ in range(4):
        out = engine(hidden_states=x, timestep=torch.tensor([300.0, 700.0]), encoder_hidden_states=c,
                     return_dict=False)[0]
        loss = out.float().pow(2).mean()
        engine.backward(loss)
        assert strategy.grads_finite(engine)
        engine.step()
        losses.append(float(loss))
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]


def test_skipped_micro_batch_keeps_accumulation_boundaries(tiny_wan, toy_data, tmp_path):
    """gradient_accumulation_steps 2, 2 ranks, bf16: a NaN loss in the second micro-batch of step 2 skips that whole
    step, and the run ends with the weights of the run whose step 2 was skipped from its first micro-batch on
    (bit for bit); a step that shifted DeepSpeed's accumulation boundary by one micro-batch would not."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    runs = {}
    for fault in ("nan_loss_micro1@2", "nan_loss@2"):
        out = tmp_path / fault.replace("@", "_")
        path = write_recipe(tmp_path / f"{out.name}.yaml", finetune_recipe(
            tiny_wan, toy_data, out, max_train_steps=4, train_batch_size=2, gradient_accumulation_steps=2,
            mixed_precision="bf16", nonfinite_policy="skip"))
        res = run_cli(deepspeed_cmd(2, path), env={"DS_DISTILL_FAULT": fault})
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "step 2: non-finite student loss; that update was skipped" in res.stdout + res.stderr
        m = read_metrics(out)
        assert [x["nonfinite/skipped"] for x in m] == [0, 1, 0, 0]
        runs[fault] = (m, get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoint-4"), tag="student"))
    (m_a, w_a), (m_b, w_b) = runs.values()
    assert [x["student/loss"] for x in m_a[2:]] == [x["student/loss"] for x in m_b[2:]]
    assert w_a.keys() == w_b.keys() and all(torch.equal(w_a[k], w_b[k]) for k in w_a)


def _runtime(recipe: dict, path, dist_env):
    from ds_distill.dispatch import build_runtime, check_recipe
    from ds_distill.engines import Strategy
    from ds_distill.utils.config import load_recipe

    return build_runtime(check_recipe(load_recipe(write_recipe(path, recipe))), Strategy(dist_env))


def test_cfg_dropout_drops_to_zeros_not_the_negative_prompt(tiny_wan, toy_data, dist_env, tmp_path, monkeypatch):
    from ds_distill.utils.dataloader import ParquetDataset, collate

    recipe = finetune_recipe(tiny_wan, toy_data, tmp_path / "out", uncond_embedding="negative_prompt")
    rt = _runtime(recipe, tmp_path / "r.yaml", dist_env)
    adapter, method = rt.adapter, rt.method
    assert adapter.uncond_embedding.abs().sum() > 0  # the encoded negative prompt is there, and is not used
    ds = ParquetDataset(recipe["training"]["data_path"], recipe["training"]["text_len"], True)
    raw = {**collate([ds[i] for i in range(8)]), "sample_ids": torch.arange(8)}
    cond = adapter.prepare_batch(raw, latents_source="data").cond
    seen = []
    real = adapter.predict_noise
    monkeypatch.setattr(adapter, "predict_noise", lambda role, x, t, c: (seen.append(c.detach().clone()),
                                                                        real(role, x, t, c))[1])
    for rate in (1.0, 0.0, 0.5):
        method.config.training_cfg_rate = rate
        with torch.no_grad():
            method.loss(raw)
        used = seen.pop()
        dropped = [bool((u == 0).all()) for u in used]
        kept = [bool(torch.equal(u, c)) for u, c in zip(used, cond)]
        assert all(d != k for d, k in zip(dropped, kept))  # each sample: exactly zeros or exactly its own text
        if rate == 1.0:
            assert all(dropped)
        elif rate == 0.0:
            assert all(kept)
        else:
            assert any(dropped) and any(kept)


@pytest.mark.parametrize("warp", [False, True])
def test_warp_denoising_step(warp, tiny_wan, toy_data, dist_env, tmp_path, monkeypatch):
    """False: the student runs exactly the listed timesteps (FastVideo's 8-step list here); True: the list is
    warped by flow_shift. Validation samples the same schedule either way."""
    from ds_distill.samplers.sde import sde_timesteps
    from ds_distill.utils import rng
    from ds_distill.utils.dataloader import ParquetDataset, collate

    steps = [1000, 993, 987, 981, 975, 909, 725, 421]
    recipe = dmd2_recipe(tiny_wan, toy_data, tmp_path / "out",
                         method={"dmd_denoising_steps": steps, "warp_denoising_step": warp})
    rt = _runtime(recipe, tmp_path / "r.yaml", dist_env)
    method, adapter = rt.method, rt.adapter
    expected = torch.tensor(steps, dtype=torch.float32)
    if warp:
        expected = adapter.shift_timesteps(expected)
        assert not torch.equal(expected, torch.tensor(steps, dtype=torch.float32))
    assert torch.equal(method.step_timesteps, expected)
    seen = []
    real = adapter.predict_noise
    monkeypatch.setattr(adapter, "predict_noise", lambda role, x, t, c: (seen.append(t.clone()),
                                                                        real(role, x, t, c))[1])
    ds = ParquetDataset(recipe["training"]["data_path"], recipe["training"]["text_len"], False)
    b = adapter.prepare_batch({**collate([ds[i] for i in range(2)]), "sample_ids": torch.arange(2)},
                              latents_source="zeros")
    # a step whose shared exit index runs the whole schedule
    step = next(s for s in range(200) if rng.shared_randint(len(steps), method.seed, "critic_rollout", s) == 7)
    with torch.no_grad():
        method.student_sample(b, step, with_grad=False, stream="critic_rollout")
    assert torch.equal(torch.stack([t[0] for t in seen]), expected)
    raw = method.validation_request().sampling_timesteps
    assert torch.allclose(sde_timesteps(raw, recipe["pipeline_config"]["flow_shift"]), expected, rtol=0, atol=1e-3)

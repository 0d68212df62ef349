"""Diffusers' fp32 modules in training: the teacher is the model users sample, the student computes as deployed.

`WanTransformer3DModel.from_pretrained(..., torch_dtype=bfloat16)` keeps `_keep_in_fp32_modules` (time embedder,
scale_shift_tables, norm2) in fp32. Every role here is built as ds_distill builds it: zero.Init, bf16, ZeRO-3 with
stage3_param_persistence_threshold 0 (every tensor of the tiny model partitioned), leaf blocks, and called through
the adapter's predict_noise / predict_x0.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import PYTHON, REPO, free_port, run_cli

BF16_REL = 2.0 ** -8
"""bf16's relative precision: the tolerance of a match "within bf16" (relative L2 error of the output)."""


@pytest.fixture
def torch_linear(monkeypatch):
    """torch's own F.linear for the test: zero.Init with memory_efficient_linear replaces it process-wide, so
    another test in this session may have left DeepSpeed's version behind; the builds below must not do that."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as Patcher

    original = getattr(Patcher, "linear_bk", F.linear)
    monkeypatch.setattr(torch.nn.functional, "linear", original)
    return original


def _configs(world: int):
    from ds_distill.engines import eval_ds_config, load_template, train_ds_config

    frozen = eval_ds_config(load_template("ds_configs/zero3_inference.json", "<test>", "t"), micro_batch=1,
                            world_size=world, precision="bf16", offload="none", nvme_path=None)
    train = train_ds_config(load_template("ds_configs/zero3_train.json", "<test>", "t"), micro_batch=1,
                            grad_accum=1, world_size=world, precision="bf16", max_grad_norm=0.0)
    for cfg in (frozen, train):
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return frozen, train


def _adapter(comps, dist):
    from ds_distill.adapters.wan import WanAdapter

    training = SimpleNamespace(mixed_precision="bf16", text_len=16, num_frames=9, height=16, width=16)
    return WanAdapter(comps, SimpleNamespace(flow_shift=3.0), training, dist.device)


def _inputs(comps):
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, 4, 3, 8, 8, generator=g)
    t = torch.tensor([999.0, 937.5, 420.25, 12.5])
    cond = torch.randn(4, 16, comps.transformer_config["text_dim"], generator=g)
    return x_t, t, cond


def _predict(adapter, role, inputs):
    with torch.no_grad():
        return adapter.predict_noise(role, *inputs), adapter.predict_x0(role, *inputs)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm())


def _reference(tiny_wan: Path, round_fp32_params: bool = False):
    from diffusers import WanTransformer3DModel

    ref = WanTransformer3DModel.from_pretrained(str(tiny_wan / "transformer"), torch_dtype=torch.bfloat16)
    if round_fp32_params:  # what a bf16-stored role holds: the same values rounded, still computed in fp32
        for p in ref.parameters():
            p.data = p.data.to(torch.bfloat16).to(p.dtype)
    return ref


def test_teacher_in_training_is_the_diffusers_bf16_model(tiny_wan, dist_env, torch_linear, monkeypatch, capsys):
    """Frozen role (load_transformer(trainable=False) + init_frozen) vs from_pretrained(torch_dtype=bf16): equal
    within bf16 (measured: bit-identical), and much closer than the build before this fix."""
    from diffusers import WanTransformer3DModel

    import ds_distill.models.wan as wan
    from ds_distill.engines import Strategy
    from ds_distill.models.components import load_weights_streaming, transformer_dir
    from ds_distill.roles import RoleHandle

    strategy = Strategy(dist_env)
    family = wan.WanFamily()
    comps = family.components(str(tiny_wan), "<test>", "path")
    frozen_cfg, _ = _configs(dist_env.world_size)
    teacher = family.load_transformer(comps, strategy, frozen_cfg, trainable=False)
    strategy.mark_leaf_modules(teacher, family.zero3_leaf_modules)
    engine = strategy.init_frozen(teacher, frozen_cfg)
    assert F.linear is torch_linear, "building a role replaced torch.nn.functional.linear process-wide"

    ref = _reference(tiny_wan)
    params = dict(teacher.named_parameters())
    assert all(p.data.numel() == 0 for p in params.values()), "threshold 0: nothing stays gathered"
    fp32 = sorted(n for n, p in params.items() if p.ds_tensor.dtype == torch.float32)
    assert fp32 == sorted(n for n, p in ref.named_parameters() if p.dtype == torch.float32) != []
    assert all(p.ds_tensor.dtype == torch.bfloat16 for n, p in params.items() if n not in fp32)

    adapter = _adapter(comps, dist_env)
    inputs = _inputs(comps)
    v, x0 = _predict(adapter, RoleHandle("teacher", teacher, False, engine), inputs)
    v_ref, x0_ref = _predict(adapter, RoleHandle("reference", ref, False), inputs)

    # The same role as built before this fix: everything bf16 under a plain zero.Init (which also swaps F.linear).
    monkeypatch.setattr(wan, "keep_diffusers_fp32", lambda module, fp32_storage: [])
    with strategy.zero_init(frozen_cfg):
        before = WanTransformer3DModel.from_config(
            {k: val for k, val in comps.transformer_config.items() if not k.startswith("_")})
    load_weights_streaming(before, transformer_dir(comps.path), dist_env.rank)
    before_engine = strategy.init_frozen(before, frozen_cfg)
    v_before, x0_before = _predict(adapter, RoleHandle("before", before, False, before_engine), inputs)

    figures = {"v_rel": _rel(v, v_ref), "x0_rel": _rel(x0, x0_ref), "v_max": float((v - v_ref).abs().max()),
               "v_rel_before": _rel(v_before, v_ref), "x0_rel_before": _rel(x0_before, x0_ref),
               "v_max_before": float((v_before - v_ref).abs().max()), "v_scale": float(v_ref.abs().max())}
    with capsys.disabled():
        print("\nteacher vs from_pretrained(bf16):", json.dumps(figures))
    assert figures["v_rel"] <= BF16_REL / 16 and figures["x0_rel"] <= BF16_REL / 16
    assert figures["v_max"] <= BF16_REL * figures["v_scale"]
    # The check can tell the two builds apart: before, the error was a whole bf16 rounding's worth.
    assert figures["v_rel_before"] > 0.25 * BF16_REL > figures["v_rel"]


def test_student_computes_fp32_modules_in_fp32(tiny_wan, dist_env, torch_linear, capsys):
    """Trainable role (bf16 ZeRO-3 optimizer, checkpointing on): DeepSpeed keeps one bf16 flat partition per role,
    so the fp32 modules are *stored* in bf16 (their fp32 masters live in the optimizer); they are *computed* in
    fp32. Equal to diffusers' bf16 model whose fp32 parameters hold the same bf16-rounded values (tolerance
    BF16_REL/16, measured 0), within bf16 of the unrounded model, and the time embedder trains."""
    from ds_distill.engines import OptimizerSpec, Strategy
    from ds_distill.models.wan import WanFamily
    from ds_distill.models.wan_common import fp32_parameter_names
    from ds_distill.roles import RoleHandle

    strategy = Strategy(dist_env)
    family = WanFamily()
    comps = family.components(str(tiny_wan), "<test>", "path")
    _, train_cfg = _configs(dist_env.world_size)
    student = family.load_transformer(comps, strategy, train_cfg, trainable=True)
    strategy.mark_leaf_modules(student, family.zero3_leaf_modules)
    student.enable_gradient_checkpointing()
    spec = OptimizerSpec(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0, eps=1e-8, max_grad_norm=0.0,
                         lr_scheduler="constant", warmup_steps=0, total_steps=1)
    engine = strategy.init_trainable(student, train_cfg, spec)
    assert F.linear is torch_linear
    assert {p.ds_tensor.dtype for p in student.parameters()} == {torch.bfloat16}

    adapter = _adapter(comps, dist_env)
    inputs = _inputs(comps)
    role = RoleHandle("student", student, True, engine)
    v, x0 = _predict(adapter, role, inputs)
    v_rounded, x0_rounded = _predict(adapter, RoleHandle("r", _reference(tiny_wan, round_fp32_params=True), False),
                                     inputs)
    v_ref, _ = _predict(adapter, RoleHandle("ref", _reference(tiny_wan), False), inputs)
    figures = {"v_rel_vs_rounded": _rel(v, v_rounded), "x0_rel_vs_rounded": _rel(x0, x0_rounded),
               "v_rel_vs_from_pretrained": _rel(v, v_ref)}
    with capsys.disabled():
        print("\nstudent:", json.dumps(figures))
    assert figures["v_rel_vs_rounded"] <= BF16_REL / 16 and figures["x0_rel_vs_rounded"] <= BF16_REL / 16
    assert figures["v_rel_vs_from_pretrained"] <= 2 * BF16_REL

    # Steps through the engine (ZeRO-3's trace complete after the first) move the fp32-computed parameters: the
    # gradient reaches their bf16 storage.
    names = ["condition_embedder.time_embedder.linear_1.weight", "scale_shift_table", "blocks.0.norm2.weight"]
    assert set(names) <= set(fp32_parameter_names(student))
    params = dict(student.named_parameters())
    before = {n: params[n].ds_tensor.clone() for n in names}
    for _ in range(3):
        loss = adapter.predict_noise(role, *inputs).square().mean()
        adapter.backward(role, loss)
        strategy.step(engine)
    assert not any(torch.equal(before[n], params[n].ds_tensor) for n in names)


def test_two_ranks_teacher_and_student_match_diffusers(tiny_wan, tmp_path):
    """2 ranks, threshold 0: the teacher is bit-identical to from_pretrained(bf16) (tolerance BF16_REL/16), the
    student within bf16; every tensor really split across the ranks; torch's F.linear left alone."""
    cmd = [str(Path(PYTHON).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "helpers" / "precision_probe.py"), str(tiny_wan),
           str(REPO / "ds_configs" / "zero3_train.json"), str(REPO / "ds_configs" / "zero3_inference.json"),
           str(tmp_path / "probe")]
    res = run_cli(cmd)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"probe.rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["torch_linear_untouched"] is True
        assert r["gathered_outside_forward"] == []
        assert r["student_dtypes"] == ["torch.bfloat16"]
        # Largest tensor 24,576 elements: each rank holds half of every tensor.
        assert all(r["local_numel"][n] * 2 == -(-full // 2) * 2 for n, full in r["full_numel"].items())
    report = ranks[0]
    assert report["teacher_fp32"] == report["reference_fp32"] != []
    assert report["teacher_v_rel"] <= BF16_REL / 16
    assert max(report["teacher_v_max"], report["teacher_x0_max"]) <= BF16_REL * report["scale"]
    assert report["student_v_rel"] <= 2 * BF16_REL

"""The production regime at tiny size: ZeRO-3 with every tensor partitioned (persistence threshold 0), bf16,
three roles with different weights, activation checkpointing really recomputing, 1 rank == 2 ranks."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import INFERENCE_T0, REPO, TRAIN_T0, read_metrics, three_role_dmd2_recipe, write_recipe
from ds_distill import export

# bf16 has an 8-bit significand (one ulp = 2^-8 relative, 3.9e-3). 1 rank (batch 2) and 2 ranks (1 each) differ
# in matmul blocking and in the order gradients are summed across ranks, so losses and gradient norms agree to a
# few ulps, not bitwise. Observed (relative, worst step, two runs): student loss 7.6e-3 / 1.5e-3, grad norm
# 4.4e-3 / 2.1e-3; critic loss 6.1e-4 / 1.0e-3, grad norm 4.3e-4 / 8.4e-4.
LOSS_RTOL = 2e-2
# Weights: Adam moves each weight by about lr per step whatever its gradient's size, so where a gradient is close
# to zero its sign (and the weight's move) can differ between the two runs: elementwise the runs may differ by a
# few lr. What must hold is that the runs moved alike overall: the RMS difference of the final weights is small
# against how far the run moved in its last checkpoint interval (2 iterations). Observed: 0.11 (student),
# 0.03 (critic), 0.10 (student EMA); elementwise at most 3.4e-3 (student, lr 1e-3).
WEIGHT_RMS_RATIO = 0.25


def test_test_templates_are_the_stock_ones_at_threshold_0():
    """tests/ds_configs differ from ds_configs/ in the persistence threshold only (and it is 0)."""
    for test, stock in ((TRAIN_T0, "zero3_train.json"), (INFERENCE_T0, "zero3_inference.json")):
        mine, theirs = json.loads(test.read_text()), json.loads((REPO / "ds_configs" / stock).read_text())
        assert mine["zero_optimization"].pop("stage3_param_persistence_threshold") == 0
        theirs["zero_optimization"].pop("stage3_param_persistence_threshold")
        assert mine == theirs, f"{test.name} drifted from ds_configs/{stock}: copy it again with threshold 0"


def test_three_roles_have_different_weights(three_wans):
    from safetensors.torch import load_file

    w = {r: load_file(str(p / "transformer" / export.WEIGHTS_NAME)) for r, p in three_wans.items()}
    for a, b in (("student", "teacher"), ("student", "critic"), ("teacher", "critic")):
        assert w[a].keys() == w[b].keys()
        assert all(not torch.equal(w[a][k], w[b][k]) for k in w[a] if w[a][k].numel() > 1 and w[a][k].std() > 0)


def exported(checkpoint, role: str, ema: bool, tmp_path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = tmp_path / f"{checkpoint.parent.name}-{checkpoint.name}-{role}-{ema}"
    export.convert(checkpoint, out, role=role, ema=ema, log=lambda *a, **k: None)
    return load_file(str(out / "transformer" / export.WEIGHTS_NAME))


def test_bf16_dmd2_one_rank_matches_two_ranks(bf16_dmd2_runs, tmp_path):
    """Same global batch (1x2 vs 2x1), bf16, threshold 0, three distinct roles, checkpointing on, EMA on:
    the same losses per step and the same final weights (student, critic, student EMA) within bf16 tolerance."""
    one, two = bf16_dmd2_runs[1], bf16_dmd2_runs[2]
    # the runs are in the regime this test claims: bf16 optimizer files, the threshold-0 templates, 3 sources
    for out, world in ((one, 1), (two, 2)):
        saved = yaml.safe_load((out / "recipe.yaml").read_text())
        assert saved["training"]["ds_config"] == str(TRAIN_T0)
        assert saved["training"]["ds_config_inference"] == str(INFERENCE_T0)
        assert saved["training"]["mixed_precision"] == "bf16" and saved["training"]["gradient_checkpointing"]
        assert len({saved["roles"][r]["path"] for r in ("student", "teacher", "critic")}) == 3
        names = sorted(p.name for p in (out / "checkpoint-4" / "student").glob("*optim_states.pt"))
        assert names == [f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]

    a, b = read_metrics(one), read_metrics(two)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4]
    worst = {}
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        assert ("student/loss" in x) == (x["step"] % 2 == 0)
        for k in x:
            if k.endswith(("/loss", "/grad_norm")):
                worst[k] = max(worst.get(k, 0.0), abs(x[k] - y[k]) / max(abs(x[k]), 1e-12))
                assert x[k] == pytest.approx(y[k], rel=LOSS_RTOL), (x["step"], k, x[k], y[k])
    print(f"\nmax relative difference 1 vs 2 ranks: {worst}")

    rms = {}
    for role, ema in (("student", False), ("critic", False), ("student", True)):
        wa, wb, wa2 = (exported(run / f"checkpoint-{step}", role, ema, tmp_path)
                       for run, step in ((one, 4), (two, 4), (one, 2)))
        assert wa.keys() == wb.keys() == wa2.keys()
        diff = torch.cat([(wa[k] - wb[k]).flatten() for k in wa])
        moved = torch.cat([(wa[k] - wa2[k]).flatten() for k in wa])
        name = role + (" EMA" if ema else "")
        rms[name] = (float(diff.pow(2).mean().sqrt()), float(moved.pow(2).mean().sqrt()), float(diff.abs().max()))
        print(f"{name}: RMS |1 rank - 2 ranks| {rms[name][0]:.2e} (max {rms[name][2]:.2e}); RMS move over the last "
              f"2 iterations {rms[name][1]:.2e}")
    for name, (d, m, _) in rms.items():
        assert m > 0 and d <= WEIGHT_RMS_RATIO * m, (name, d, m)


# -- activation checkpointing -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt_runtime(dist_env, three_wans, toy_data, tmp_path_factory):
    """An in-process bf16 DMD2 runtime at threshold 0, three distinct roles, gradient_checkpointing on."""
    from ds_distill.dispatch import build_runtime, check_recipe
    from ds_distill.engines import Strategy
    from ds_distill.utils.config import load_recipe
    from ds_distill.utils.dataloader import ParquetDataset, TrainLoader

    tmp = tmp_path_factory.mktemp("ckpt")
    recipe = three_role_dmd2_recipe(three_wans, toy_data, tmp / "out", train_batch_size=2, max_grad_norm=0.0,
                                    mixed_precision="bf16", data_path=str(toy_data / "text_only"),
                                    gradient_checkpointing=True)
    rt = build_runtime(check_recipe(load_recipe(write_recipe(tmp / "r.yaml", recipe))), Strategy(dist_env))
    rt.loader = TrainLoader(ParquetDataset(toy_data / "text_only", 16, need_latents=False), 2, 0, 1, seed=0)
    return rt


class BlockCalls:
    """Counts calls of a module's transformer blocks, split into before and during backward. A pre-hook: the
    recompute of non-reentrant checkpointing stops once it has what backward needs, before post-hooks run."""

    def __init__(self, module):
        self.phase, self.calls = "forward", {"forward": 0, "backward": 0}
        self.hooks = [b.register_forward_pre_hook(self.hit) for b in module.blocks]

    def hit(self, *args):
        self.calls[self.phase] += 1

    def remove(self):
        for h in self.hooks:
            h.remove()


def grads_of_one_backward(rt, raw: dict, role: str, loss_fn, step: int) -> tuple[dict, dict, dict]:
    """Full gradients of `role` from one loss and backward, and the block calls of student and critic."""
    from deepspeed.utils import safe_get_full_grad

    m, a = rt.method, rt.adapter
    b = a.prepare_batch(raw, latents_source="zeros")
    counters = {r: BlockCalls(getattr(m, r).module) for r in ("student", "critic")}
    try:
        loss = loss_fn(b, step)
        for c in counters.values():
            c.phase = "backward"
        a.backward(getattr(m, role), loss)
    finally:
        for c in counters.values():
            c.remove()
    handle = getattr(m, role)
    grads = {n: safe_get_full_grad(p).float().clone() for n, p in handle.module.named_parameters()}
    handle.engine.optimizer.zero_grad()
    return grads, counters["student"].calls, counters["critic"].calls


def test_gradient_checkpointing_recomputes_and_matches_no_checkpointing(ckpt_runtime):
    """Checkpointing is on inside the engines, the blocks really run again in backward (the student's in its
    DMD loss, where the critic scores under no_grad and is not recomputed; the critic's in its own loss), and
    the gradients equal those of the same step without checkpointing (bf16, threshold 0)."""
    from ds_distill.models.wan_common import fp32_parameter_names

    m = ckpt_runtime.method
    n_blocks = len(m.student.module.blocks)
    for r in ("student", "critic", "teacher"):
        params = list(getattr(m, r).module.parameters())
        assert all(hasattr(p, "ds_id") and not p.ds_persist for p in params), r  # ZeRO-3, nothing persistent
        # bf16 storage, except that the frozen teacher keeps diffusers' fp32 modules in fp32 (tests/test_precision.py)
        fp32 = set(fp32_parameter_names(getattr(m, r).module)) if r == "teacher" else set()
        assert fp32 or r != "teacher"
        for n, p in getattr(m, r).module.named_parameters():
            assert p.dtype == (torch.float32 if n in fp32 else torch.bfloat16), (r, n, p.dtype)
    assert m.student.module.gradient_checkpointing and m.critic.module.gradient_checkpointing

    raw = next(ckpt_runtime.loader)
    results = {}
    try:
        for on in (True, False):
            for r in ("student", "critic"):
                getattr(m, r).module.gradient_checkpointing = on
            results[on] = {"student": grads_of_one_backward(ckpt_runtime, raw, "student", m.generator_loss, 2),
                           "critic": grads_of_one_backward(ckpt_runtime, raw, "critic", m.critic_loss, 3)}
    finally:
        for r in ("student", "critic"):
            getattr(m, r).module.gradient_checkpointing = True

    gs, student_calls, critic_calls = results[True]["student"]
    assert student_calls["backward"] == n_blocks  # the one grad-enabled student forward, recomputed
    assert critic_calls["forward"] == n_blocks and critic_calls["backward"] == 0  # critic scored under no_grad
    gc, student_calls, critic_calls = results[True]["critic"]
    assert critic_calls["backward"] == n_blocks and student_calls["backward"] == 0
    for role, got in (("student", gs), ("critic", gc)):
        plain, s_calls, c_calls = results[False][role]
        assert s_calls["backward"] == c_calls["backward"] == 0  # off: nothing runs twice
        assert any(float(v.abs().max()) > 0 for v in got.values()), role
        for k in got:
            torch.testing.assert_close(got[k], plain[k], rtol=0, atol=0, msg=f"{role} {k}")

"""The student EMA under bf16 ZeRO-3: an fp32 average of the fp32 master weights, for every parameter (ZeRO-3's
persistent ones included), and validation with it computes what a plain model loaded with the EMA computes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, TRAIN_T0, free_port, run_cli

BF16_ULP = 2.0**-8
"""Spacing of bf16 numbers in [1, 2): outputs in bf16 compute are compared in units of it times their scale."""


@pytest.mark.parametrize("threshold", [1000, 0], ids=["persistent+partitioned", "all-partitioned"])
def test_ema_is_fp32_master_average_and_validates_like_a_plain_model(threshold, tiny_wan, tmp_path):
    """2 ranks, bf16, 6 AdamW steps at lr 1e-2 (decay 0.7, averaging from step 2). With threshold 1000 the tiny
    model's biases and norms (<= 1000 elements) stay whole on every rank while its matrices are partitioned."""
    cmd = [str(Path(PYTHON).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "helpers" / "ema_probe.py"), str(tiny_wan), str(TRAIN_T0), str(threshold),
           str(tmp_path)]
    res = run_cli(cmd)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads((tmp_path / "report.json").read_text())
    assert r["names"] and r["param_dtypes"] == ["torch.bfloat16"]
    if threshold:
        assert r["persistent"] > 0 and r["partitioned"] > 0
    else:
        assert r["persistent"] == 0
    # The EMA read back from its checkpoint files equals an fp32 EMA of the fp32 master weights...
    assert r["ema_vs_fp32_ref"] <= 1e-6
    # ...which an EMA of the bf16 weights (the partitions the forward pass uses) would miss by far.
    assert r["staircase_vs_fp32_ref"] > 1e-4
    # Inside swapped_in() the module computes what from_pretrained(EMA folder, torch_dtype=bf16) computes, within
    # 8 bf16 ulps of the output's scale (the same module and plain model agree to ~3 ulps on the live weights).
    tol = 8 * BF16_ULP * r["output_scale"]
    assert r["swapped_vs_plain"] <= tol, r
    assert r["swapped_vs_live"] > 10 * tol  # the EMA is not the live weights
    if threshold:  # leaving ZeRO-3's whole (persistent) parameters live would be seen
        assert r["persistent_left_live_vs_plain"] > 2 * tol, r
    assert r["restored"]  # after the block the module computes with its own weights again, bit for bit

"""Crash safety and non-finite guards, on real runs killed with SIGKILL at chosen points."""
from __future__ import annotations

import json
import signal

import pytest
import torch

from conftest import finetune_recipe, read_metrics, run_cli, train_cmd, write_recipe


def weights(checkpoint, role="student"):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=role)


@pytest.fixture(scope="module")
def straight(tiny_wan, toy_data, tmp_path_factory):
    """The uninterrupted reference run: 12 steps, a checkpoint every 4."""
    tmp = tmp_path_factory.mktemp("straight")
    path = write_recipe(tmp / "r.yaml", finetune_recipe(tiny_wan, toy_data, tmp / "out", max_train_steps=12,
                                                        checkpointing_steps=4, checkpoints_total_limit=2))
    res = run_cli(train_cmd(path))
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "out"


@pytest.mark.parametrize("fault, resumes_from", [
    ("mid_save@8", "checkpoint-4"),        # partitions of step 8 written, folder never sealed
    ("before_latest@8", "checkpoint-8"),   # sealed and renamed, `latest` still names checkpoint-4
    ("after_step@10", "checkpoint-8"),     # between checkpoints
])
def test_sigkill_then_resume_equals_uninterrupted(fault, resumes_from, straight, tiny_wan, toy_data, tmp_path):
    out = tmp_path / "out"
    path = write_recipe(tmp_path / "r.yaml", finetune_recipe(tiny_wan, toy_data, out, max_train_steps=12,
                                                             checkpointing_steps=4, checkpoints_total_limit=2))
    res = run_cli(train_cmd(path), env={"DS_DISTILL_FAULT": fault})
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    if fault.startswith("mid_save"):
        assert (out / ".tmp-checkpoint-8").is_dir() and not (out / "checkpoint-8").exists()
    res = run_cli(train_cmd(path, "--resume", "latest"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {out / resumes_from}" in res.stderr
    assert not any(p.name.startswith(".tmp-checkpoint") for p in out.iterdir())  # the half-written one is gone
    assert [m["student/loss"] for m in read_metrics(out)] == [m["student/loss"] for m in read_metrics(straight)]
    a, b = weights(straight / "checkpoint-12"), weights(out / "checkpoint-12")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "latest").read_text() == "checkpoint-12"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-8"]


@pytest.mark.parametrize("fault", ["nan_loss@3", "nan_grad@3"])
def test_nonfinite_step_is_skipped_with_weights_unchanged(fault, tiny_wan, toy_data, tmp_path):
    out = tmp_path / "out"
    path = write_recipe(tmp_path / "r.yaml", finetune_recipe(
        tiny_wan, toy_data, out, max_train_steps=4, checkpointing_steps=1, checkpoints_total_limit=0,
        nonfinite_policy="skip"))
    res = run_cli(train_cmd(path), env={"DS_DISTILL_FAULT": fault})
    assert res.returncode == 0, res.stderr[-3000:]
    what = "loss" if "loss" in fault else "gradient"
    assert f"step 3: non-finite student {what}; that update was skipped" in res.stderr
    m = read_metrics(out)
    assert [x["nonfinite/skipped"] for x in m] == [0, 0, 1, 0]
    w2, w3, w4 = (weights(out / f"checkpoint-{s}") for s in (2, 3, 4))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # the skipped step changed nothing
    assert any(not torch.equal(w3[k], w4[k]) for k in w3) and all(torch.isfinite(v).all() for v in w4.values())


def test_nonfinite_abort_after_patience(tiny_wan, toy_data, tmp_path):
    out = tmp_path / "out"
    path = write_recipe(tmp_path / "r.yaml", finetune_recipe(
        tiny_wan, toy_data, out, max_train_steps=6, checkpointing_steps=2, nonfinite_policy="abort",
        nonfinite_patience=2))
    res = run_cli(train_cmd(path), env={"DS_DISTILL_FAULT": "nan_loss@3,nan_loss@4"})
    assert res.returncode == 3
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "2 steps in a row with a non-finite student loss (up to step 4)" in lines[0]
    assert "last checkpoint: " + str(out / "checkpoint-2") in lines[0]
    assert "Traceback" not in res.stderr
    assert (out / "latest").read_text() == "checkpoint-2"
    w = weights(out / "checkpoint-2")
    assert all(torch.isfinite(v).all() for v in w.values())
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2

"""Preemption (issue 11): SIGTERM / SIGINT finish the step on every rank, save, say how to resume and exit
143 / 130; the resumed run ends with the same weights as an uninterrupted one. Rank 0 alone receives the signal in
the injected cases (`DS_DISTILL_FAULT=sigterm@N`: a real signal through the real handler), so the 2-rank test also
shows that the ranks agree on the step they stop at."""
from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch

from conftest import REPO, deepspeed_cmd, finetune_recipe, read_metrics, run_cli, train_cmd, write_recipe

STEPS = 6


def fp32_weights(checkpoint: Path, role: str = "student") -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=role)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = fp32_weights(a), fp32_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:  # tolerance: exact (same data, noise and reduction order)
        assert torch.equal(wa[k], wb[k]), k


def leftover_processes(tag: str) -> list[int]:
    """Processes still carrying this run's environment tag (the run's DataLoader workers inherit it)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("DS_DISTILL_TEST_TAG") == tag:
                found.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


@pytest.fixture(scope="module")
def straight(tiny_wan, toy_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    path = write_recipe(tmp / "r.yaml", finetune_recipe(tiny_wan, toy_data, tmp / "out", max_train_steps=STEPS,
                                                        dataloader_num_workers=1))
    res = run_cli(train_cmd(path))
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "out"


def test_sigterm_one_rank_saves_and_resumes_to_the_same_weights(straight, tiny_wan, toy_data, tmp_path):
    out = tmp_path / "out"
    path = write_recipe(tmp_path / "r.yaml", finetune_recipe(tiny_wan, toy_data, out, max_train_steps=STEPS,
                                                             dataloader_num_workers=1))
    tag = uuid.uuid4().hex
    res = run_cli(train_cmd(path), env={"DS_DISTILL_FAULT": "sigterm@3", "DS_DISTILL_TEST_TAG": tag})
    assert res.returncode == 143, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert (f"stopped by SIGTERM after step 3; checkpoint: {out / 'checkpoint-3'}; to continue, run the same "
            f"command with --resume latest") in res.stderr
    assert (out / "latest").read_text() == "checkpoint-3" and not (out / ".run.lock").exists()
    assert leftover_processes(tag) == []  # the DataLoader worker ended with the run
    res = run_cli(train_cmd(path, "--resume", "latest"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert [m["student/loss"] for m in read_metrics(out)] == [m["student/loss"] for m in read_metrics(straight)]
    assert_same_weights(straight / f"checkpoint-{STEPS}", out / f"checkpoint-{STEPS}")


def test_sigterm_on_rank_0_stops_both_ranks_at_the_same_step(tiny_wan, toy_data, tmp_path):
    """bf16, ZeRO-3 partitioned over 2 ranks; only rank 0 gets SIGTERM after step 3."""
    def recipe(out):
        return write_recipe(out.parent / f"{out.name}.yaml", finetune_recipe(
            tiny_wan, toy_data, out, max_train_steps=STEPS, mixed_precision="bf16", train_batch_size=2))

    a, b = tmp_path / "straight", tmp_path / "preempted"
    res = run_cli(deepspeed_cmd(2, recipe(a)))
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli(deepspeed_cmd(2, recipe(b)), env={"DS_DISTILL_FAULT": "sigterm@3"})
    assert res.returncode == 143, res.stderr[-3000:]
    assert f"stopped by SIGTERM after step 3; checkpoint: {b / 'checkpoint-3'}" in res.stderr
    assert sorted(p.name for p in (b / "checkpoint-3" / "student").glob("*model_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
    assert [m["step"] for m in read_metrics(b)] == [1, 2, 3]
    res = run_cli(deepspeed_cmd(2, recipe(b), "--resume", "latest"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_weights(a / f"checkpoint-{STEPS}", b / f"checkpoint-{STEPS}")


def test_ctrl_c_mid_run_saves_without_a_traceback(tiny_wan, toy_data, tmp_path):
    out = tmp_path / "out"
    path = write_recipe(tmp_path / "r.yaml", finetune_recipe(tiny_wan, toy_data, out, max_train_steps=100000,
                                                             dataloader_num_workers=1))
    tag = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                              "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", DS_DISTILL_TEST_TAG=tag)
    proc = subprocess.Popen(train_cmd(path), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (out / "metrics.jsonl").is_file():
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "received SIGINT: finishing this step" in err
    step = read_metrics(out)[-1]["step"]
    assert f"stopped by SIGINT after step {step}; checkpoint: {out / f'checkpoint-{step}'}" in err
    assert (out / "latest").read_text() == f"checkpoint-{step}"
    assert leftover_processes(tag) == []


def test_grace_period_exceeded_leaves_the_last_complete_checkpoint(tiny_wan, toy_data, tmp_path):
    from ds_distill.utils.checkpoint import find_resume_checkpoint, list_checkpoints

    out = tmp_path / "out"
    path = write_recipe(tmp_path / "r.yaml", finetune_recipe(tiny_wan, toy_data, out, max_train_steps=STEPS,
                                                             checkpointing_steps=2, preemption_grace_s=0.001))
    res = run_cli(train_cmd(path), env={"DS_DISTILL_FAULT": "sigterm@3"})
    assert res.returncode == 143, res.stderr[-3000:]
    assert "training.preemption_grace_s (0.001 s) ran out" in res.stderr and "Traceback" not in res.stderr
    assert [s for s, _ in list_checkpoints(out)] == [2]  # step 3's save never became a checkpoint
    assert find_resume_checkpoint(out, "latest") == out / "checkpoint-2"
    assert not (out / ".run.lock").exists()

"""Multi-rank ZeRO-3 on the CPU: real partitioning, 1 rank == 2 ranks, and exact resume."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, REPO, deepspeed_cmd, finetune_recipe, free_port, read_metrics, run_cli, train_cmd, \
    write_recipe


def test_two_ranks_partition_every_parameter(tiny_wan, toy_data, tmp_path):
    """The suite's recipes (conftest: persistence threshold 0) leave no tensor whole on any rank."""
    recipe = finetune_recipe(tiny_wan, toy_data, tmp_path / "out")
    path = write_recipe(tmp_path / "r.yaml", recipe)
    cmd = [str(Path(PYTHON).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "helpers" / "partition_probe.py"), str(path), str(tmp_path / "probe")]
    res = run_cli(cmd)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"probe.rank{r}.json").read_text())["student"] for r in range(2)]
    total_full = total_local = 0
    assert ranks[0].pop("__optimizer__") and ranks[1].pop("__optimizer__")
    for name, (numel, local, _) in ranks[0].items():
        assert local == math.ceil(numel / 2), name  # each rank holds half (padded), not a whole copy
        assert ranks[1][name][1] == local
        total_full += numel
        total_local += local
    assert total_full == sum(p.numel() for p in __import__("diffusers").WanTransformer3DModel.from_pretrained(
        tiny_wan / "transformer").parameters())
    assert total_local < 0.51 * total_full


def test_two_ranks_match_one_rank(tiny_wan, toy_data, tmp_path):
    """Same global batch (1x8 vs 2x4): same per-step losses and gradient norms."""
    runs = {}
    for nproc, micro in ((1, 8), (2, 4)):
        out = tmp_path / f"r{nproc}"
        path = write_recipe(tmp_path / f"r{nproc}.yaml", finetune_recipe(
            tiny_wan, toy_data, out, max_train_steps=5, train_batch_size=micro, dataloader_num_workers=1))
        cmd = train_cmd(path) if nproc == 1 else deepspeed_cmd(2, path)
        res = run_cli(cmd)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        runs[nproc] = read_metrics(out)
    assert len(runs[1]) == len(runs[2]) == 5
    for a, b in zip(runs[1], runs[2]):
        assert a["student/loss"] == pytest.approx(b["student/loss"], rel=1e-5)
        assert a["student/grad_norm"] == pytest.approx(b["student/grad_norm"], rel=1e-4)


def fp32_weights(checkpoint: Path, role: str) -> dict[str, torch.Tensor]:
    """Weights of a role in a checkpoint, read by DeepSpeed's own zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=role)


def test_killed_run_resumes_exactly(tiny_wan, toy_data, tmp_path):
    """SIGKILL after step 11 (checkpoint at 10), `--resume latest`: same weights and losses as no crash."""
    def recipe(out):
        return write_recipe(tmp_path / f"{out}.yaml", finetune_recipe(
            tiny_wan, toy_data, tmp_path / out, max_train_steps=14, checkpointing_steps=5, dataloader_num_workers=1))

    ref = recipe("straight")
    res = run_cli(train_cmd(ref))
    assert res.returncode == 0, res.stderr[-3000:]

    crashed = recipe("crashed")
    res = run_cli(train_cmd(crashed), env={"DS_DISTILL_FAULT": "after_step@11"})
    assert res.returncode != 0  # killed
    out = tmp_path / "crashed"
    assert (out / "latest").read_text().strip() == "checkpoint-10"
    res = run_cli(train_cmd(crashed, "--resume", "latest"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr and "checkpoint-10" in res.stderr

    a, b = read_metrics(tmp_path / "straight"), read_metrics(out)
    assert [m["step"] for m in b] == list(range(1, 15))
    assert [m["student/loss"] for m in a] == [m["student/loss"] for m in b]
    wa = fp32_weights(tmp_path / "straight" / "checkpoint-14", "student")
    wb = fp32_weights(out / "checkpoint-14", "student")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_dmd2_two_ranks_match_one_rank(tiny_wan, toy_data, tmp_path):
    """simulate rollout, generator_update_interval 2, 20 iterations: 2 ranks finish (no hang: same collectives
    on every rank) and give 1 rank's losses for the same global batch."""
    from conftest import dmd2_recipe

    runs = {}
    for nproc, micro in ((1, 2), (2, 1)):
        out = tmp_path / f"d{nproc}"
        recipe = dmd2_recipe(tiny_wan, toy_data, out, max_train_steps=20, train_batch_size=micro,
                             data_path=str(toy_data / "text_only"), dataloader_num_workers=0,
                             gradient_checkpointing=True)
        path = write_recipe(tmp_path / f"d{nproc}.yaml", recipe)
        res = run_cli(train_cmd(path) if nproc == 1 else deepspeed_cmd(2, path), timeout=900)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        runs[nproc] = read_metrics(out)
    assert [m["step"] for m in runs[2]] == list(range(1, 21))
    for a, b in zip(runs[1], runs[2]):
        assert a.keys() == b.keys()
        assert ("student/loss" in a) == (a["step"] % 2 == 0)
        for k in ("critic/loss", "student/loss"):
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7), (a["step"], k)


def test_resume_two_ranks_on_one_rank(tiny_wan, toy_data, tmp_path):
    """A 2-rank DMD2 checkpoint (with EMA) resumes on 1 rank through DeepSpeed's universal checkpoint: same
    global batch, so the losses continue as the 2-rank run's own continuation does."""
    from conftest import dmd2_recipe

    def recipe(name, nproc, steps):
        out = tmp_path / name
        r = dmd2_recipe(tiny_wan, toy_data, out, max_train_steps=steps, train_batch_size=2 // nproc,
                        data_path=str(toy_data / "text_only"), checkpointing_steps=4, dataloader_num_workers=0,
                        method={"ema_decay": 0.9})
        return write_recipe(tmp_path / f"{name}-{nproc}-{steps}.yaml", r), out

    path, ref = recipe("two", 2, 8)
    res = run_cli(deepspeed_cmd(2, path), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    path4, out = recipe("moved", 2, 4)
    res = run_cli(deepspeed_cmd(2, path4), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    path8, _ = recipe("moved", 1, 8)
    res = run_cli(train_cmd(path8, "--resume", "latest"), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "written by 2 ranks, this run has 1: converting to a universal checkpoint" in res.stderr
    a, b = read_metrics(ref), read_metrics(out)
    assert [m["step"] for m in b] == list(range(1, 9))
    for x, y in zip(a, b):
        for k in ("critic/loss", "student/loss"):
            if k in x:
                assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k)
    from ds_distill.methods.distribution_matching.ema import whole_tensors

    ema_a = whole_tensors(sorted((ref / "checkpoint-8" / "student" / "ema").glob("*.safetensors")))
    ema_b = whole_tensors(sorted((out / "checkpoint-8" / "student" / "ema").glob("*.safetensors")))
    for k in ema_a:
        torch.testing.assert_close(ema_a[k], ema_b[k], rtol=1e-4, atol=1e-6)

"""A run folder has one owner and an earlier run's files are never lost (issue 11): every file of a real finished
run (recipe.yaml, metrics.jsonl, TensorBoard events, checkpoints, `latest`) is hashed before and after a failed
run, a dry run, a second run while the first holds the folder, and a run without --resume."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, finetune_recipe, read_metrics, run_cli, train_cmd, write_recipe
from test_bad_inputs import snapshot

STEPS = 2


@pytest.fixture(scope="module")
def old_run(tiny_wan, toy_data, tmp_path_factory) -> Path:
    """A real finished run: 2 steps, a checkpoint after each."""
    tmp = tmp_path_factory.mktemp("old")
    path = write_recipe(tmp / "r.yaml", finetune_recipe(tiny_wan, toy_data, tmp / "out", max_train_steps=STEPS,
                                                        checkpointing_steps=1, checkpoints_total_limit=0))
    res = run_cli(train_cmd(path))
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "out"


def copy_of(old_run: Path, tmp: Path, tiny_wan, toy_data, **training) -> tuple[Path, Path]:
    """This test's own copy of the old run and a recipe pointing at it."""
    out = tmp / "out"
    shutil.copytree(old_run, out)
    training = {"max_train_steps": STEPS, "checkpointing_steps": 1, "checkpoints_total_limit": 0, **training}
    return out, write_recipe(tmp / "r.yaml", finetune_recipe(tiny_wan, toy_data, out, **training))


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    from ds_distill.train import main

    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(argv))
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def test_old_run_has_every_kind_of_file(old_run):
    names = set(snapshot(old_run))
    assert {"recipe.yaml", "metrics.jsonl", "latest", "checkpoint-2/trainer_state.json"} <= names
    assert any(n.startswith("logs/events.out.tfevents") for n in names)
    assert not (old_run / ".run.lock").exists()  # released at the end


def test_failed_run_changes_nothing(old_run, tiny_wan, toy_data, tmp_path, capsys):
    """A check that fails (bad data on resume) and a failure after the folder was locked (DeepSpeed cannot
    load a damaged optimizer file) both leave every file as it was, and release the lock."""
    out, path = copy_of(old_run, tmp_path, tiny_wan, toy_data, max_train_steps=4, data_path=str(tmp_path / "nope"))
    before = snapshot(out)
    code, _, err = run_main(["--config", str(path), "--resume", "latest"], capsys)
    assert code == 2 and "training.data_path does not exist" in one_error_line(err)
    assert snapshot(out) == before

    path = write_recipe(path, finetune_recipe(tiny_wan, toy_data, out, max_train_steps=4))
    optim = next((out / "checkpoint-2" / "student").glob("*optim_states.pt"))
    optim.write_bytes(b"damaged")
    before = snapshot(out)
    res = run_cli(train_cmd(path, "--resume", "latest"))
    assert res.returncode != 0
    assert snapshot(out) == before and not (out / ".run.lock").exists()


def test_dry_run_writes_nothing(old_run, tiny_wan, toy_data, tmp_path):
    out, path = copy_of(old_run, tmp_path, tiny_wan, toy_data, max_train_steps=4)
    before = snapshot(out)
    res = run_cli(train_cmd(path, "--resume", "latest", "--dry-run"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "nothing was written" in res.stdout
    assert snapshot(out) == before
    fresh = tmp_path / "fresh"
    path = write_recipe(tmp_path / "f.yaml", finetune_recipe(tiny_wan, toy_data, fresh))
    res = run_cli(train_cmd(path, "--dry-run"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert not fresh.exists()  # not even the folder


def test_second_run_on_a_held_folder_is_refused(old_run, tiny_wan, toy_data, tmp_path, capsys):
    """Run A holds the folder (frozen with SIGSTOP mid-training so its files stand still); run B, with and
    without --resume, is refused with one line naming A; A then continues, and stops on SIGTERM with a save."""
    out, path = copy_of(old_run, tmp_path, tiny_wan, toy_data, max_train_steps=100000, checkpointing_steps=0)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                              "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    a = subprocess.Popen(train_cmd(path, "--resume", "latest"), cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and a.poll() is None:
            if (out / ".run.lock").exists() and len(read_metrics(out)) > STEPS:
                break
            time.sleep(0.2)
        assert a.poll() is None, a.communicate()[1][-3000:]
        os.kill(a.pid, signal.SIGSTOP)
        before = snapshot(out)
        holder = json.loads((out / ".run.lock").read_text())
        assert holder == {**holder, "host": socket.gethostname(), "pid": a.pid}
        for extra in (["--resume", "latest"], []):
            code, _, err = run_main(["--config", str(path), *extra], capsys)
            line = one_error_line(err)
            assert code == 2 and f"in use by pid {a.pid} on this host" in line, line
            assert snapshot(out) == before
    finally:
        os.kill(a.pid, signal.SIGCONT)
        a.send_signal(signal.SIGTERM)
        _, err = a.communicate(timeout=300)
    assert a.returncode == 143, err[-3000:]
    assert "--resume latest" in err and not (out / ".run.lock").exists()


def test_run_without_resume_is_refused_and_overwrite_moves_aside(old_run, tiny_wan, toy_data, tmp_path, capsys):
    out, path = copy_of(old_run, tmp_path, tiny_wan, toy_data)
    before = snapshot(out)
    code, _, err = run_main(["--config", str(path)], capsys)
    line = one_error_line(err)
    assert code == 2 and "holds an earlier run" in line and "--overwrite" in line
    assert snapshot(out) == before

    res = run_cli(train_cmd(path, "--overwrite"))
    assert res.returncode == 0, res.stderr[-3000:]
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("out.old-")]
    assert len(moved) == 1 and f"moved the earlier run in {out} to {moved[0]}" in res.stdout
    assert snapshot(moved[0]) == before  # the old run, whole, under its new name
    assert [m["step"] for m in read_metrics(out)] == [1, 2]  # a new run, not appended to the old one


def test_resume_past_the_end_says_so(old_run, tiny_wan, toy_data, tmp_path, capsys):
    out, path = copy_of(old_run, tmp_path, tiny_wan, toy_data)
    before = snapshot(out)
    code, stdout, err = run_main(["--config", str(path), "--resume", "latest"], capsys)
    assert code == 0 and "is at step 2 and training.max_train_steps is 2: nothing to train" in stdout, err
    assert snapshot(out) == before


def test_stale_lock_is_taken_over(old_run, tiny_wan, toy_data, tmp_path):
    out, path = copy_of(old_run, tmp_path, tiny_wan, toy_data, max_train_steps=3)
    dead = subprocess.Popen([PYTHON, "-c", "pass"])
    dead.wait()
    (out / ".run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "then"}))
    res = run_cli(train_cmd(path, "--resume", "latest"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"taking over the lock of pid {dead.pid} on this host" in res.stderr
    assert (out / "checkpoint-3").is_dir() and not (out / ".run.lock").exists()

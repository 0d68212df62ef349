"""`deepspeed --hostfile` on this machine, and the shipped hostfile.example (see the README's Launching section).

The two-host launch over pdsh/ssh lives in test_launch_multihost.py (marker `multihost`).
"""
from __future__ import annotations

import re
from pathlib import Path

from conftest import PYTHON, REPO, dmd2_recipe, free_port, read_metrics, run_cli, write_recipe

DEEPSPEED = str(Path(PYTHON).parent / "deepspeed")


def test_hostfile_example_is_what_the_launcher_parses():
    """hostfile.example is a valid hostfile (comments included) and its --include example selects what it says."""
    from deepspeed.launcher.runner import fetch_hostfile, parse_inclusion_exclusion

    pool = fetch_hostfile(str(REPO / "hostfile.example"))
    assert pool is not None and len(pool) == 2 and all(slots == 8 for slots in pool.values()), pool
    first, second = pool
    picked = parse_inclusion_exclusion(pool, f"{first}:0,1@{second}", "")
    assert picked == {first: [0, 1], second: list(range(8))}
    dropped = parse_inclusion_exclusion(pool, "", f"{second}:7")
    assert dropped == {first: list(range(8)), second: list(range(7))}


def test_deepspeed_hostfile_localhost(tiny_wan, toy_data, tmp_path):
    """`deepspeed --hostfile H --no_ssh --node_rank 0 --master_addr 127.0.0.1` with `localhost slots=2`: 2 ranks of
    tiny DMD2 (no sshd needed: --no_ssh runs the node's share of the job right here)."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "dmd2.yaml", dmd2_recipe(
        tiny_wan, toy_data, out, max_train_steps=2, train_batch_size=1, checkpointing_steps=0,
        data_path=str(toy_data / "text_only")))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# one node, two ranks (CPU: slots are processes)\nlocalhost slots=2\n")
    cmd = [DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", "0", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--module", "ds_distill.train", "--config", str(recipe)]
    res = run_cli(cmd, timeout=600)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-6000:]
    # The launcher read the hostfile: one node, both slots, two processes.
    assert "WORLD INFO DICT: {'localhost': [0, 1]}" in log, log[-4000:]
    assert "dist_world_size=2" in log
    assert len(re.findall(r"process \d+ spawned with command", log)) == 2
    assert len(re.findall(r"Process \d+ exits successfully", log)) == 2
    # The trainer saw the same world.
    assert "ds_distill: dmd2 on wan (2 ranks" in res.stdout, res.stdout[-3000:]
    assert "1 per rank x 1 accumulation x 2 ranks = 2 samples per step" in res.stdout
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    assert all("critic/loss" in m for m in read_metrics(out))

"""A real two-node launch: `deepspeed --hostfile` -> pdsh -> ssh -> sshd on two "hosts", then a resume across them.

The hosts are two network namespaces made here (tests/helpers/netns.py): a veth pair with the same interface
name on both ends, an sshd per namespace, a throwaway key and ssh config. The launcher runs inside node 0 as a
user would on a cluster's head node:

    ip netns exec NODE0 deepspeed --hostfile hostfile --master_addr 10.213.0.1 --master_port P \
        --module ds_distill.train --config dmd2.yaml [training.max_train_steps=3 --resume latest]

with `.deepspeed_env` in the working directory carrying what the remote ranks need. Tiny DMD2 under ZeRO-3,
world size 2, one rank per host; the checkpoint it writes at step 2 is resumed to step 3 on the same two hosts.

Skipped (with the reason) only where namespaces cannot be made (not root, `ip netns add` refused) or
sshd / pdsh are missing (tools/install_multihost_deps.sh installs them). Run: pytest -m multihost.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, dmd2_recipe, read_metrics, write_recipe

pytestmark = pytest.mark.multihost

VENV_BIN = Path(PYTHON).parent
DEEPSPEED = str(VENV_BIN / "deepspeed")
LAUNCH_TIMEOUT = 360


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory, request):
    from helpers.netns import ClusterUnavailable, TwoHostCluster

    cluster = TwoHostCluster(tmp_path_factory.mktemp("cluster"))
    request.addfinalizer(cluster.down)  # sshds killed by pid, namespaces deleted, keys removed, even on failure
    try:
        cluster.up()
    except ClusterUnavailable as exc:
        pytest.skip(f"two-host launch not possible here: {exc}")
    return cluster


def deepspeed_env(ifname: str) -> str:
    """What every remote rank needs; the launcher exports these on each node before starting it."""
    env = {
        "GLOO_SOCKET_IFNAME": ifname,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DS_DISTILL_NO_TQDM": "1",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")),
    }
    return "".join(f"{k}={v}\n" for k, v in env.items())


def launch(cluster, workdir: Path, port: int, recipe: Path, *extra: str, log_name: str) -> tuple[int, str]:
    """Run the deepspeed launcher inside node 0 (cwd = workdir, where hostfile and .deepspeed_env are)."""
    cmd = cluster.in_node(0, [DEEPSPEED, "--hostfile", "hostfile", "--master_addr", cluster.addrs[0],
                              "--master_port", str(port), "--module", "ds_distill.train",
                              "--config", str(recipe), *extra])
    # An empty HOME keeps a ~/.deepspeed_env of whoever runs the suite out of this launch (the launcher reads
    # ~/.deepspeed_env, then ./.deepspeed_env); ssh itself ignores $HOME, the wrapper on PATH brings its config.
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    env = cluster.launcher_env(dict(os.environ, HOME=str(home), OMP_NUM_THREADS="1"))
    log_path = workdir / log_name
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        rc = None  # stays None if interrupted (e.g. pytest-timeout): the finally below still cleans up
        try:
            rc = proc.wait(timeout=LAUNCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            rc = -1
        finally:
            if proc.poll() is None:
                # Timed out or interrupted: launcher, pdsh and ssh clients share its process group. SIGKILL, not
                # SIGTERM: the runner answers SIGTERM/SIGINT with `pdsh ... pkill -f <python> -u -m
                # deepspeed.launcher.launch` on every node, and the namespaces share the machine's pid space,
                # so that would also hit other people's deepspeed launches. The ranks go by pid below.
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if rc != 0:  # failed, timed out or interrupted
                cluster.kill_strays()  # ranks left under the sshds
    return rc, log_path.read_text()


def host_lines(log: str, addr: str) -> list[str]:
    """pdsh prefixes every line a node prints with `ADDR: `."""
    prefix = f"{addr}: "
    return [ln[len(prefix):] for ln in log.splitlines() if ln.startswith(prefix)]


def check_two_hosts_ran(cluster, log: str) -> None:
    """Each host ran exactly one rank, through pdsh over ssh, and it finished."""
    assert f"cmd = pdsh -S -f 1024 -w {cluster.addrs[0]},{cluster.addrs[1]} " in log, log[-4000:]
    assert "deepspeed_env file = ./.deepspeed_env" in log
    for i, addr in enumerate(cluster.addrs):
        lines = "\n".join(host_lines(log, addr))
        assert f"nnodes=2, num_local_procs=1, node_rank={i}" in lines, (addr, lines[-3000:])
        assert "dist_world_size=2" in lines
        assert len(re.findall(r"process \d+ spawned with command", lines)) == 1, lines[-3000:]
        assert re.search(r"Process \d+ exits successfully", lines), (addr, lines[-3000:])
    rank0 = "\n".join(host_lines(log, cluster.addrs[0]))
    assert "ds_distill: dmd2 on wan (2 ranks" in rank0, rank0[-3000:]
    assert "1 per rank x 1 accumulation x 2 ranks = 2 samples per step" in rank0


def check_checkpoint_split(ckpt: Path) -> None:
    """The checkpoint holds one ZeRO-3 partition per rank (i.e. per host), each about half of every role."""
    import torch

    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["complete"], state
    for role in ("student", "critic"):
        parts, total, n_params = [], None, None
        for rank in (0, 1):
            model = torch.load(ckpt / role / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt",
                               map_location="cpu", weights_only=False)
            optim = torch.load(ckpt / role / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                               map_location="cpu", weights_only=False)["optimizer_state_dict"]
            assert model["dp_world_size"] == 2 and optim["partition_count"] == 2
            shapes = [s for group in model["param_shapes"] for s in group.values()]
            total = sum(int(torch.Size(s).numel()) for s in shapes)
            n_params = len(shapes)
            parts.append(torch.cat([t.flatten() for t in optim["fp32_flat_groups"]]))
        local = [p.numel() for p in parts]
        assert local[0] == local[1], (role, local)
        assert abs(local[0] - total / 2) <= n_params, (role, local, total)  # half each (+ per-tensor padding)
        assert not torch.equal(parts[0], parts[1]), role  # different halves, not two copies


def test_dmd2_across_two_hosts_then_resume(two_hosts, tiny_wan, toy_data, tmp_path):
    cluster = two_hosts
    from helpers.netns import IFNAME

    work = tmp_path / "job"
    work.mkdir()
    cluster.write_hostfile(work / "hostfile", slots=1)
    (work / ".deepspeed_env").write_text(deepspeed_env(IFNAME))
    out = work / "out"  # one filesystem for both hosts, as a shared filesystem on a cluster
    recipe = write_recipe(work / "dmd2.yaml", dmd2_recipe(
        tiny_wan, toy_data, out, max_train_steps=2, checkpointing_steps=2, train_batch_size=1,
        data_path=str(toy_data / "text_only")))

    t0 = time.monotonic()
    rc, log = launch(cluster, work, 29511, recipe, log_name="launch1.log")
    assert rc == 0, log[-8000:]
    check_two_hosts_ran(cluster, log)
    first = read_metrics(out)
    assert [m["step"] for m in first] == [1, 2]
    assert "student/loss" in first[1] and all("critic/loss" in m for m in first)
    assert (out / "latest").read_text().strip() == "checkpoint-2"
    check_checkpoint_split(out / "checkpoint-2")
    t1 = time.monotonic()

    # The checkpoint written across the two hosts resumes across the same two hosts.
    rc, log = launch(cluster, work, 29512, recipe, "training.max_train_steps=3", "--resume", "latest",
                     log_name="launch2.log")
    assert rc == 0, log[-8000:]
    check_two_hosts_ran(cluster, log)
    rank0 = "\n".join(host_lines(log, cluster.addrs[0]))
    assert f"resumed from {out / 'checkpoint-2'} (step 2)" in rank0, rank0[-3000:]
    resumed = read_metrics(out)
    assert [m["step"] for m in resumed] == [1, 2, 3]
    assert resumed[:2] == first  # the resumed run kept history and only appended step 3
    assert (out / "latest").read_text().strip() == "checkpoint-3"
    check_checkpoint_split(out / "checkpoint-3")
    print(f"two-host launch {t1 - t0:.1f} s, resume {time.monotonic() - t1:.1f} s")

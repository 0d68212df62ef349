"""Every collective of the package goes through `Strategy` (engines.py) with tensors on the process group's device.

Under DeepSpeed's NCCL group a CPU tensor has no backend; the gloo group of this machine accepts anything on the
CPU and hides that. Two checks make the rule fail here: no module but engines.py calls a torch.distributed /
deepspeed.comm collective (static), and Strategy's collectives run on 2 real gloo ranks while torch's default
device is `meta` (runtime): a tensor made without naming the group's device lands on `meta`, holds no data, and
the call fails or its answer is lost (with the pre-fix `all_finite`: "Tensor.item() cannot be called on meta
tensors").
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

from conftest import PYTHON, REPO, TRAIN_T0, free_port, run_cli

COLLECTIVES = {
    "all_reduce", "all_reduce_coalesced", "reduce", "broadcast", "all_gather", "all_gather_into_tensor",
    "all_gather_coalesced", "_all_gather_base", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base",
    "gather", "scatter", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv", "batch_isend_irecv",
    "broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list", "inference_all_reduce",
}
COMM_MODULES = ("torch.distributed", "deepspeed.comm")


def collective_calls(source: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every collective called on torch.distributed / deepspeed.comm, aliases resolved."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}  # local name -> dotted module or function it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    def dotted(expr) -> str | None:
        if isinstance(expr, ast.Name):
            return aliases.get(expr.id, expr.id)
        if isinstance(expr, ast.Attribute):
            base = dotted(expr.value)
            return f"{base}.{expr.attr}" if base else None
        return None

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = dotted(node.func)
            if name and name.rsplit(".", 1)[-1] in COLLECTIVES and name.startswith(COMM_MODULES):
                found.append((node.lineno, name))
    return found


def test_checker_finds_collectives_however_spelled():
    """The static check would see a regression, whatever the import style."""
    snippet = "\n".join([
        "import torch", "import torch.distributed as dist", "from torch.distributed import broadcast as bc",
        "from deepspeed import comm", "import deepspeed",
        "torch.distributed.all_reduce(x)", "dist.all_gather_into_tensor(y, x)", "bc(x, src=0)",
        "comm.reduce_scatter_tensor(y, x)", "deepspeed.comm.broadcast(x, 0)", "dist.get_rank()", "x.all_reduce()",
    ])
    assert [line for line, _ in collective_calls(snippet)] == [6, 7, 8, 9, 10]


def test_no_collective_outside_engines():
    offenders = []
    for path in sorted((REPO / "ds_distill").rglob("*.py")):
        if path.name == "engines.py" and path.parent.name == "ds_distill":
            continue
        offenders += [f"{path.relative_to(REPO)}:{line}: {name}"
                      for line, name in collective_calls(path.read_text())]
    assert not offenders, "collectives must go through Strategy (engines.py):\n" + "\n".join(offenders)


def test_strategy_collectives_take_tensors_on_the_group_device(tiny_wan, tmp_path):
    """2 gloo ranks, default device `meta`: all_finite, grads_finite (both paths, after a real bf16 ZeRO-3 backward,
    clean and with one rank's gradient poisoned), all_reduce_mean, broadcast_tensors, the EMA swap (whole and
    partitioned parameters), the object collectives and the barrier all complete with the right answers."""
    cmd = [str(Path(PYTHON).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "helpers" / "collectives_probe.py"), str(tiny_wan), str(TRAIN_T0),
           str(tmp_path / "probe")]
    res = run_cli(cmd)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"probe.rank{r}.json").read_text()) for r in range(2)]
    for rank, r in enumerate(ranks):
        assert r["persistent"] > 0 and r["partitioned"] > 0
        assert r["all_finite(finite)"] is True
        assert r["all_finite(nan on rank 1)"] is False  # rank 0's value is finite: the answer came from rank 1
        assert r["grads_finite"] is True and r["grads_finite(per parameter)"] is True
        assert r["grads_finite(corrupt on rank 1)"] is False
        assert r["grads_finite(per parameter, corrupt on rank 1)"] is False
        assert r["all_reduce_mean"] == [[1.5, 2.0], "torch.float64", "cpu"]  # exact: (1 + 2) / 2 in float64
        assert r["broadcast_tensors"] == [0.0] * 4
        assert r["ema_swap"] is True
        assert r["broadcast_object"] == {"rank": 0}
        assert r["gather_object"] == ([0, 1] if rank == 0 else None)

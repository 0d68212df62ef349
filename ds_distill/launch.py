"""`ds-distill launch --hostfile H [deepspeed options] -- --config R.yaml [overrides]`: check the hostfile and the
recipe on the launch node, then hand over to `deepspeed --hostfile H ... --module ds_distill.train ...`.

DeepSpeed's own launcher answers a malformed hostfile with a traceback after ssh-ing around; this says what is
wrong in one line before anything starts. Options before `--` go to deepspeed unchanged.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from ds_distill.errors import UserError, exit_on_user_error

_LINE = re.compile(r"^(?P<host>\S+)\s+slots=(?P<slots>\S+)$")


def parse_hostfile(path: str | Path) -> dict[str, int]:
    """`host slots=N` lines (comments and blank lines ignored) -> {host: slots}; one-line errors otherwise."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; --hostfile needs a file of `HOST slots=N` lines")
    if not path.is_file():
        raise UserError(f"{path}: hostfile not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file; a hostfile holds `HOST slots=N` lines") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the hostfile ({exc.strerror})") from None
    hosts: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if not m:
            raise UserError(f"{path}:{n}: expected `HOST slots=N`, got {raw.strip()!r}")
        host, slots = m.group("host"), m.group("slots")
        if not slots.isdigit() or int(slots) < 1:
            raise UserError(f"{path}:{n}: slots must be a positive integer, got {slots!r}")
        if host in hosts:
            raise UserError(f"{path}:{n}: host {host!r} is listed twice (merge its slots into one line)")
        hosts[host] = int(slots)
    if not hosts:
        raise UserError(f"{path}: no hosts (add lines like `node-a slots=8`)")
    return hosts


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Launcher options before `--`, training arguments after it."""
    if "--" not in argv:
        raise UserError("usage: ds-distill launch --hostfile H [deepspeed options] -- --config R.yaml [overrides]")
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    launcher, train = split_args(argv)
    if "--hostfile" not in launcher or launcher.index("--hostfile") + 1 >= len(launcher):
        raise UserError("ds-distill launch: --hostfile H is required (use python -m ds_distill.train or deepspeed "
                        "--num_gpus N for one node)")
    hosts = parse_hostfile(launcher[launcher.index("--hostfile") + 1])
    if "--config" not in train or train.index("--config") + 1 >= len(train):
        raise UserError("ds-distill launch: the training arguments after `--` need --config R.yaml")

    from ds_distill.dispatch import check_recipe
    from ds_distill.train import parse_args
    from ds_distill.utils.config import load_recipe

    args = parse_args(train)
    check_recipe(load_recipe(args.config, args.overrides))
    deepspeed = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    if not os.access(deepspeed, os.X_OK):
        raise UserError("ds-distill launch: the `deepspeed` launcher is not installed in this environment "
                        "(pip install deepspeed)")
    cmd = [deepspeed, *launcher, "--module", "ds_distill.train", *train]
    print(f"launching on {len(hosts)} host(s), {sum(hosts.values())} rank(s): {' '.join(cmd)}", flush=True)
    os.execv(cmd[0], cmd)
    return 0  # not reached

"""Fault injection for crash tests: `DS_DISTILL_FAULT=<point>@<step>[,<point>@<step>...]` makes every rank
SIGKILL itself when it reaches that point at that step. Points: `after_step`, `mid_save` (partitions
written, folder not sealed), `before_latest` (folder renamed, `latest` not yet updated), `nan_loss`
/ `nan_grad` (a role's loss or gradient turns NaN at that step, for the non-finite guards), `nan_loss_micro<i>`
(only micro-batch i of the step), `sigterm` / `sigint`
(rank 0 alone sends itself that signal after the step, as a scheduler or Ctrl-C would: the preemption path).
Unset in normal runs: one dict lookup per call.
"""
from __future__ import annotations

import os
import signal


def _parse(spec: str) -> set[tuple[str, int]]:
    out = set()
    for part in spec.split(","):
        if "@" in part:
            point, step = part.strip().split("@", 1)
            out.add((point, int(step)))
    return out


_FAULTS = _parse(os.environ.get("DS_DISTILL_FAULT", ""))


def armed(point: str, step: int) -> bool:
    """Whether a fault is set for this point and step."""
    return (point, step) in _FAULTS


def maybe_kill(point: str, step: int) -> None:
    """SIGKILL this process if a fault is armed here (nothing is flushed, as in a real crash)."""
    if (point, step) in _FAULTS:
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_signal(step: int, rank: int) -> None:
    """Rank 0 sends itself SIGTERM/SIGINT after this step if `sigterm@step` / `sigint@step` is armed."""
    if rank != 0:
        return
    for point, sig in (("sigterm", signal.SIGTERM), ("sigint", signal.SIGINT)):
        if (point, step) in _FAULTS:
            os.kill(os.getpid(), sig)

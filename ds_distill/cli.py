"""`ds-distill <command>`: one console script for every user-facing tool."""
from __future__ import annotations

import importlib
import sys

# command -> (module with `main(argv) -> int`, one-line help)
COMMANDS = {
    "demo": ("ds_distill.demo", "the whole pipeline on the embedded tiny Wan + toy data (CPU, minutes)"),
    "train": ("ds_distill.train", "train from a recipe (same as python -m ds_distill.train)"),
    "make-tiny-wan": ("ds_distill.models.tiny", "write a tiny random Wan2.1 T2V directory (offline)"),
    "make-toy-data": ("ds_distill.utils.toy_data", "write a toy parquet dataset with a known distribution"),
    "sample": ("ds_distill.sample", "generate mp4 videos from a Wan directory (ODE or SDE sampler)"),
    "eval-toy": ("ds_distill.evaluate", "score samples against the toy dataset's known distribution"),
    "launch": ("ds_distill.launch", "check a hostfile + recipe, then run deepspeed --hostfile ... ds_distill.train"),
    "convert": ("ds_distill.export", "ZeRO-3 checkpoint -> Diffusers safetensors directory (streamed)"),
    "preprocess": ("ds_distill.preprocess", "videos + captions JSON -> training parquet (resumable)"),
    "report": ("ds_distill.report", "environment and op report (ds_report plus our ops)"),
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    rows = "\n".join(f"  {c:<{width}}  {h}" for c, (_, h) in COMMANDS.items())
    return f"usage: ds-distill <command> [args]\n\ncommands:\n{rows}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

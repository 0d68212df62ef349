"""`ds-distill <command>`: one console script for every user-facing tool, and what the commands share: an
argument parser whose mistakes are one line, the output-folder rules (generators never overwrite), and the checks
of a model folder's components that run before anything is loaded or written.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from ds_distill.errors import UserError, exit_on_user_error

# command -> (module with `main(argv) -> int`, one-line help)
COMMANDS = {
    "demo": ("ds_distill.demo", "the whole pipeline on the embedded tiny Wan + toy data (CPU, minutes)"),
    "train": ("ds_distill.train", "train from a recipe (same as python -m ds_distill.train)"),
    "make-tiny-wan": ("ds_distill.models.tiny", "write a tiny random Wan directory (offline; --variant picks which)"),
    "make-toy-data": ("ds_distill.utils.toy_data", "write a toy parquet dataset with a known distribution"),
    "sample": ("ds_distill.sample", "generate mp4 videos from a Wan directory (ODE or SDE sampler)"),
    "eval-toy": ("ds_distill.evaluate", "score samples against the toy dataset's known distribution"),
    "launch": ("ds_distill.launch", "check a hostfile + recipe, then run deepspeed --hostfile ... ds_distill.train"),
    "convert": ("ds_distill.export", "ZeRO-3 checkpoint -> Diffusers safetensors directory (streamed)"),
    "preprocess": ("ds_distill.preprocess", "videos + captions JSON -> training parquet (resumable)"),
    "report": ("ds_distill.report", "environment and op report (ds_report plus our ops)"),
    "import-recipe": ("ds_distill.import_recipe", "FastVideo fastvideo/train run config -> schema-v2 recipe"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage mistakes (unknown option, missing or malformed value) are one-line UserErrors."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def check_output_dir(path: str | Path, flag: str, overwrite: bool, swap: bool = False,
                     replaceable: Optional[Callable[[Path], bool]] = None, what: str = "") -> Path:
    """Refuse an output folder before anything is written: a file, a place we cannot write, or (without
    --overwrite) a folder that is not empty. `swap`: the folder is written aside and renamed into place (so its
    parent must be writable), else written in place. With --overwrite, `replaceable` says which folders this
    command may replace (one it made, described by `what`); anything else is left to the user to remove."""
    p = Path(os.path.expanduser(str(path)))
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p}: exists and is not a folder")
    if p.is_dir():
        try:
            busy = any(p.iterdir())
        except OSError as exc:
            raise UserError(f"{flag} {p}: cannot read the folder ({exc.strerror})") from None
        if busy and not overwrite:
            raise UserError(f"{flag} {p}: folder exists and is not empty; pass --overwrite to replace it, "
                            "or pick a new folder")
        if busy and replaceable is not None and not replaceable(p):
            raise UserError(f"{flag} {p}: --overwrite replaces only {what or 'a folder this command made'}, and "
                            "this is not one; remove it yourself or pick a new folder")
    where = p if p.is_dir() and not swap else p.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise UserError(f"{flag} {p}: {where} is a file, not a folder")
    if not os.access(where, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {p}: cannot write in {where} (permission denied)")
    return p


def check_output_file(path: str | Path, flag: str, overwrite: bool) -> Path:
    """Refuse an output file before anything is written: a folder, an existing file without --overwrite, or a
    place we cannot write."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        raise UserError(f"{flag} {p}: is a folder; expected a file path")
    if p.exists() and not overwrite:
        raise UserError(f"{flag} {p}: file exists; pass --overwrite to replace it, or pick a new name")
    if not p.parent.is_dir():
        raise UserError(f"{flag} {p}: folder {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {p}: cannot write in {p.parent} (permission denied)")
    return p


def read_json_object(path: Path, flag: str) -> dict:
    """A JSON file that must hold an object; any problem is one line naming the file."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{flag}: {path} is missing") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{flag}: {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{flag}: cannot read {path} ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"{flag}: {path} must hold a JSON object, not {type(data).__name__}")
    return data


def require_components(model_dir: Path, flag: str, parts: tuple[str, ...]) -> dict[str, dict]:
    """The configs of a Diffusers Wan folder's `parts` (vae, text_encoder: config.json and safetensors weights;
    tokenizer: its folder), or one line naming what is missing."""
    configs = {}
    for part in parts:
        sub = model_dir / part
        if not sub.is_dir():
            raise UserError(f"{flag} {model_dir}: has no {part}/ (expected a Diffusers Wan directory)")
        if part == "tokenizer":
            continue
        configs[part] = read_json_object(sub / "config.json", flag)
        check_safetensors(sub, flag)
    return configs


def check_safetensors(folder: Path, flag: str) -> None:
    """A folder's safetensors weights exist and their headers cover the files (a truncated copy fails here, in
    milliseconds, not after minutes of work); an index must name files that exist."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    for index in sorted(folder.glob("*.safetensors.index.json")):
        weight_map = read_json_object(index, flag).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{flag}: {index} has no weight_map")
        missing = sorted({v for v in weight_map.values() if not (folder / str(v)).is_file()})
        if missing:
            raise UserError(f"{flag}: {index} names {missing[0]}, which is missing ({len(missing)} shard(s))")
    if not files:
        raise UserError(f"{flag}: {folder} holds no .safetensors weights")
    for f in files:
        try:
            with safe_open(str(f), "pt") as handle:
                handle.keys()
        except Exception as exc:  # SafetensorError, OSError: both mean a damaged or partial file
            raise UserError(f"{flag}: {f} is not a readable safetensors file ({' '.join(str(exc).split())})") from None


@contextmanager
def loading(what: str, path: Path, flag: str) -> Iterator[None]:
    """Around a `from_pretrained` of the user's files only: a damaged or mismatched file (diffusers, transformers
    and safetensors raise many types for it) becomes one line naming the folder."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        reason = " ".join(str(exc).split())[:200]
        raise UserError(f"{flag} {path}: cannot load the {what} ({type(exc).__name__}: {reason})") from None


@contextmanager
def write_aside_then_swap(out: Path) -> Iterator[Path]:
    """Yield a new hidden sibling folder to write into. When the block ends without error the new folder takes
    `out`'s place and only then is the old one (moved aside first) removed, so `out` never holds a mix of old and
    new files; on an error the new folder is removed and `out` is as it was. An empty `out` is kept and filled."""
    out = Path(out).expanduser().absolute()  # `.` has no name to put a sibling beside
    out.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    new.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any folder the user makes
    try:
        yield new
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    if out.is_dir() and not any(out.iterdir()):  # an empty folder (maybe someone's cwd): keep it, fill it
        for child in new.iterdir():
            os.rename(child, out / child.name)
        new.rmdir()
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.rename(out, old)
    os.rename(new, out)
    if old.exists():
        shutil.rmtree(old)


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    rows = "\n".join(f"  {c:<{width}}  {h}" for c, (_, h) in COMMANDS.items())
    return f"usage: ds-distill <command> [args]\n\ncommands:\n{rows}\n"


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise UserError(f"unknown command {command!r} (commands: {', '.join(COMMANDS)})")
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""Checkpoints that a crash cannot corrupt.

Layout: `output_dir/checkpoint-<step>/<role>/` (each trainable role's DeepSpeed files) plus
`trainer_state.json`, and `output_dir/latest` naming the newest checkpoint. A checkpoint is written under
`.tmp-checkpoint-<step>/`, flushed, then renamed; `latest` is replaced last. A folder without its
`trainer_state.json` is never loaded, so a crash mid-write leaves the previous checkpoint in charge.
The output folder must be visible to every rank (a shared filesystem on multi-node runs), as DeepSpeed's
own checkpoint tools assume.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from ds_distill.errors import CheckpointError

logger = logging.getLogger("ds_distill")

STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def tmp_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f".tmp-checkpoint-{step}"


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under root (before a rename publishes them)."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def is_complete(path: Path) -> bool:
    """A checkpoint folder counts only once its trainer state is in place."""
    state = Path(path) / STATE_FILE
    if not state.is_file():
        return False
    try:
        return bool(json.loads(state.read_text()).get("complete"))
    except (json.JSONDecodeError, OSError):
        return False


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    out = []
    d = Path(output_dir)
    if not d.is_dir():
        return out
    for child in d.iterdir():
        m = _CKPT_RE.match(child.name)
        if m and child.is_dir() and is_complete(child):
            out.append((int(m.group(1)), child))
    return sorted(out)


def read_state(path: Path) -> dict:
    """The trainer state of a complete checkpoint."""
    return json.loads((Path(path) / STATE_FILE).read_text())


def find_resume_checkpoint(output_dir: Path, resume: str) -> Path | None:
    """`latest` -> the newest complete checkpoint (None if there is none); a path -> that checkpoint, checked."""
    if resume == "latest":
        output_dir = Path(output_dir)
        named = None
        latest = output_dir / LATEST_FILE
        if latest.is_file():
            named = output_dir / latest.read_text().strip()
        found = list_checkpoints(output_dir)
        if named is not None and is_complete(named):
            newest = max(found, key=lambda x: x[0]) if found else None
            if newest is None or newest[1] == named:
                return named
        if named is not None and not is_complete(named):
            logger.warning("`latest` names %s, which is not a complete checkpoint; looking for an older one", named)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).exists() and (path.parent / STATE_FILE).exists():
        path = path.parent  # a role folder was given: resume its checkpoint
    if not path.is_dir():
        raise CheckpointError(f"{path}: --resume: checkpoint folder does not exist")
    if not is_complete(path):
        raise CheckpointError(
            f"{path}: --resume: not a complete checkpoint (no {STATE_FILE}; a save was interrupted?); "
            "use --resume latest to pick the newest complete one"
        )
    return path


def begin_save(output_dir: Path, step: int, is_main: bool) -> Path:
    """Rank 0 clears a leftover temporary folder of this step; the caller barriers before writing."""
    tmp = tmp_dir(output_dir, step)
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    return tmp


def commit_save(output_dir: Path, step: int, state: dict, keep_last: int, protect: Path | None) -> Path:
    """Rank 0, after every rank wrote into the temporary folder: seal, rename, point `latest`, rotate."""
    output_dir = Path(output_dir)
    tmp = tmp_dir(output_dir, step)
    final = checkpoint_dir(output_dir, step)
    state = dict(state, complete=True)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    fsync_tree(tmp)
    if final.exists():
        # Re-saving a step (e.g. resumed exactly at it): move the old copy aside first, drop it after.
        old = output_dir / f".old-checkpoint-{step}"
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    abandon_newer(output_dir, step)
    _fsync_dir(output_dir)
    from ds_distill.utils import faults

    faults.maybe_kill("before_latest", step)
    write_text_atomic(output_dir / LATEST_FILE, final.name)
    rotate(output_dir, keep_last, protect={final} | ({Path(protect)} if protect else set()))
    return final


def abandon_newer(output_dir: Path, step: int) -> None:
    """Checkpoints newer than the one just written belong to a run that was rolled back (--resume of an older
    checkpoint): rename them out of the way so `--resume latest` can never pick them, but keep the files."""
    for s, path in list_checkpoints(output_dir):
        if s > step:
            target = output_dir / f"abandoned-{path.name}"
            n = 1
            while target.exists():
                target, n = output_dir / f"abandoned-{path.name}.{n}", n + 1
            os.rename(path, target)
            logger.warning("%s is newer than the checkpoint just written (step %d): renamed to %s", path, step,
                           target.name)


def rotate(output_dir: Path, keep_last: int, protect: set[Path]) -> None:
    """Delete the oldest complete checkpoints beyond `keep_last`, never a protected one."""
    if keep_last <= 0:
        return
    found = list_checkpoints(output_dir)
    excess = len(found) - keep_last
    for _, path in found:
        if excess <= 0:
            break
        if any(path.resolve() == p.resolve() for p in protect if p is not None and Path(p).exists()):
            continue
        shutil.rmtree(path, ignore_errors=True)
        excess -= 1


def clean_stale_tmp(output_dir: Path) -> None:
    """Remove temporary folders left by an interrupted save (rank 0, at start-up)."""
    d = Path(output_dir)
    if not d.is_dir():
        return
    for child in d.iterdir():
        if child.name.startswith((".tmp-checkpoint-", ".old-checkpoint-")) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# One owner per run folder

LOCK_FILE = ".run.lock"


def read_lock(output_dir: Path) -> dict | None:
    """The lock's holder ({host, pid, since}), or None when the folder is not locked."""
    path = Path(output_dir) / LOCK_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return {"host": "?", "pid": -1, "since": "?"}  # torn write: treat as a holder we cannot verify
    return data if isinstance(data, dict) else {"host": "?", "pid": -1, "since": "?"}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_is_stale(holder: dict) -> bool:
    """A lock left by a dead process on this host (another host's lock can't be verified: never stale)."""
    import socket

    if holder.get("host") != socket.gethostname():
        return False
    pid = int(holder.get("pid", -1))
    return pid <= 0 or pid == os.getpid() or not _pid_alive(pid)


def lock_refusal(output_dir: Path, holder: dict) -> str:
    """The one line that names the holder and how to remove a lock that outlived its run."""
    import socket

    lock = Path(output_dir) / LOCK_FILE
    where = "this host" if holder.get("host") == socket.gethostname() else f"host {holder.get('host')}"
    return (f"{output_dir}: the run folder is in use by pid {holder.get('pid')} on {where} (since "
            f"{holder.get('since')}); wait for that run or stop it, or, if it is gone, delete {lock}")


def check_lock(output_dir: Path) -> None:
    """Read-only: refuse a folder held by a live run (preflight, every rank)."""
    holder = read_lock(output_dir)
    if holder is not None and not lock_is_stale(holder):
        raise CheckpointError(lock_refusal(output_dir, holder))


def acquire_lock(output_dir: Path) -> Path:
    """Rank 0: create `output_dir/.run.lock` atomically with this host and pid; take over a stale one."""
    import socket
    import time

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = output_dir / LOCK_FILE
    body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = read_lock(output_dir)
            if holder is None:
                continue
            if not lock_is_stale(holder):
                raise CheckpointError(lock_refusal(output_dir, holder))
            logger.warning("%s: taking over the lock of pid %s on this host, which is no longer running",
                           output_dir, holder.get("pid"))
            stale = output_dir / f"{LOCK_FILE}.stale-{os.getpid()}"
            try:
                os.rename(lock, stale)
                os.unlink(stale)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        return lock
    raise CheckpointError(f"{output_dir}: could not take the run folder's lock ({lock}); another run is starting")


def release_lock(lock: Path | None) -> None:
    """Remove our own lock (never another process's)."""
    if lock is None:
        return
    holder = read_lock(lock.parent)
    if holder is not None and holder.get("pid") == os.getpid():
        try:
            lock.unlink()
        except FileNotFoundError:
            pass


def run_contents(output_dir: Path) -> list[str]:
    """What a run folder holds besides its lock (empty: a fresh run may use it)."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if p.name != LOCK_FILE)


def aside_name(output_dir: Path) -> Path:
    """A sibling name, not yet taken, for moving an old run out of the way (`--overwrite`)."""
    import time

    output_dir = Path(output_dir)
    base = output_dir.with_name(f"{output_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    target, n = base, 1
    while target.exists():
        target, n = base.with_name(f"{base.name}.{n}"), n + 1
    return target


def move_aside(output_dir: Path, lock: Path) -> tuple[Path, Path]:
    """Rank 0, holding the old folder's lock: rename the old run to a sibling, lock a fresh folder.
    Returns (where the old run went, the new lock)."""
    output_dir = Path(output_dir)
    target = aside_name(output_dir)
    os.rename(output_dir, target)
    new_lock = acquire_lock(output_dir)
    release_lock(target / LOCK_FILE)
    return target, new_lock

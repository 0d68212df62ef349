"""Experiment tracking owned by the trainer: TensorBoard and/or Weights & Biases on rank 0, nothing elsewhere.

`training.trackers` lists the backends (`tensorboard`, `wandb`, or `none`); several write the same scalars and
validation videos at once. `wandb` is an optional extra, imported only when a recipe asks for it."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ds_distill.errors import RecipeError, UserError

logger = logging.getLogger("ds_distill")

KNOWN_TRACKERS = ("tensorboard", "wandb", "none")


def check_trackers(training, source: str) -> None:
    """`training.trackers` names known backends, `none` stands alone, and `wandb` is installed when asked for."""
    names = list(training.trackers)
    for name in names:
        if name not in KNOWN_TRACKERS:
            raise RecipeError(f"{source}: training.trackers: unknown tracker {name!r} (available: "
                              f"{', '.join(KNOWN_TRACKERS)})")
    if "none" in names and len(names) > 1:
        raise RecipeError(f"{source}: training.trackers: `none` cannot be combined with other trackers {names}")
    if len(set(names)) != len(names):
        raise RecipeError(f"{source}: training.trackers: {names} lists a tracker twice")
    if "wandb" in names and not wandb_installed():
        raise RecipeError(f"{source}: training.trackers: wandb is not installed (an optional extra); "
                          f"`pip install wandb`, or remove it from the list")


def wandb_installed() -> bool:
    """Whether `import wandb` can work (without importing it: that takes a second)."""
    try:
        return importlib.util.find_spec("wandb") is not None
    except ValueError:  # sys.modules["wandb"] is None: the import is blocked
        return False


class _TensorBoard:
    """Event files under output_dir/logs; created on the first write."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.purge_step: Optional[int] = None
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self.purge_step)
        return self._writer

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def video(self, tag: str, frames: np.ndarray, path: Optional[Path], step: int, fps: int) -> None:
        import torch

        video = torch.from_numpy(np.asarray(frames))
        if video.dtype != torch.uint8:
            video = (video.clamp(0, 1) * 255).round().to(torch.uint8)
        self.writer.add_video(tag, video.permute(0, 3, 1, 2).unsqueeze(0), step, fps=fps)  # [1, T, C, H, W]

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = None


class _Wandb:
    """One wandb run under output_dir/wandb (online, or offline with WANDB_MODE=offline); started by
    `Tracker.start()` before the first step, after every check, so a dry run or a failed check leaves nothing."""

    def __init__(self, run_dir: Path, project: str, run_name: Optional[str], config: dict):
        self.run_dir, self.project, self.run_name, self.config = run_dir, project, run_name, config
        self._run = None

    @property
    def run(self):
        if self._run is None:
            import wandb

            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                self._run = wandb.init(project=self.project, name=self.run_name, dir=str(self.run_dir),
                                       config=self.config, reinit="create_new")
            except Exception as exc:  # no login, no network in online mode, a bad setting
                reason = " ".join(str(exc).split())[:200]
                raise UserError(f"training.trackers: wandb could not start a run ({type(exc).__name__}: {reason}); "
                                f"run `wandb login`, or set WANDB_MODE=offline to log locally") from None
        return self._run

    def start(self) -> None:
        self.run  # noqa: B018 -- starting the run is the point: a login or network problem shows now

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def video(self, tag: str, frames: np.ndarray, path: Optional[Path], step: int, fps: int) -> None:
        import wandb

        if path is not None:  # the mp4 the validator wrote: nothing to encode again
            media = wandb.Video(str(path), format="mp4")
        else:
            array = np.asarray(frames)
            if array.dtype != np.uint8:
                array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
            media = wandb.Video(array.transpose(0, 3, 1, 2), fps=fps, format="gif")  # [T, C, H, W]
        self.run.log({tag: media}, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.run.log({tag: text}, step=step)

    def flush(self) -> None:
        """wandb writes as it goes."""

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
        self._run = None


class Tracker:
    """Writes scalars (`role/name`), videos and text to every configured backend; a no-op off rank 0 or with
    `trackers: [none]`."""

    def __init__(self, log_dir: str | Path, enabled: bool, trackers: tuple[str, ...] = ("tensorboard",),
                 project: str = "ds_distill", run_name: Optional[str] = None, config: Optional[dict] = None):
        self.log_dir = Path(log_dir)
        self.backends: dict[str, Any] = {}
        if enabled:
            if "tensorboard" in trackers:
                self.backends["tensorboard"] = _TensorBoard(self.log_dir)
            if "wandb" in trackers:
                self.backends["wandb"] = _Wandb(self.log_dir.parent, project, run_name, config or {})
        self.enabled = bool(self.backends)

    @classmethod
    def for_run(cls, recipe, is_main: bool) -> "Tracker":
        """The trackers a recipe asks for, writing into its output_dir (`logs/` and `wandb/`)."""
        t = recipe.training
        return cls(Path(t.output_dir) / "logs", is_main, tuple(t.trackers),
                   project=t.tracker_project_name, run_name=t.wandb_run_name, config=recipe.to_dict())

    @property
    def purge_step(self) -> Optional[int]:
        """On resume: TensorBoard hides events at or past this step that the interrupted run wrote."""
        tb = self.backends.get("tensorboard")
        return tb.purge_step if tb is not None else None

    @purge_step.setter
    def purge_step(self, step: Optional[int]) -> None:
        if "tensorboard" in self.backends:
            self.backends["tensorboard"].purge_step = step

    def start(self) -> str | None:
        """Start the backends that talk to a service (wandb) before the first step; returns the one-line reason
        one could not start, or None."""
        try:
            for b in self.backends.values():
                if hasattr(b, "start"):
                    b.start()
        except UserError as exc:
            return str(exc)
        return None

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        for b in self.backends.values():
            b.scalars(values, step)

    def log_video(self, tag: str, frames: np.ndarray, step: int, fps: int = 8, path: Optional[Path] = None) -> None:
        """frames: [T, H, W, 3] floats in [0, 1] or uint8; `path`: the same video as an mp4 file, if written."""
        for b in self.backends.values():
            b.video(tag, frames, path, step, fps)

    def log_text(self, tag: str, text: str, step: int) -> None:
        for b in self.backends.values():
            b.text(tag, text, step)

    def flush(self) -> None:
        for b in self.backends.values():
            b.flush()

    def close(self) -> None:
        for b in self.backends.values():
            b.close()
        self.backends = {}
        self.enabled = False

"""Experiment tracking owned by the trainer: TensorBoard scalars and videos on rank 0, nothing elsewhere."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger("ds_distill")


class Tracker:
    """Writes scalars (`role/name`) and videos; a no-op off rank 0 or with `trackers: [none]`.

    The event file is created on the first write, so a run that stops before training (a dry run, a failed
    check) adds nothing to the output folder."""

    def __init__(self, log_dir: str | Path, enabled: bool):
        self.log_dir = Path(log_dir)
        self.enabled = enabled
        self._writer = None
        self.purge_step: int | None = None
        """On resume: TensorBoard hides events at or past this step that the interrupted run wrote."""

    @property
    def writer(self):
        if self._writer is None and self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self.purge_step)
        return self._writer

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def log_video(self, tag: str, frames: np.ndarray, step: int, fps: int = 8) -> None:
        """frames: [T, H, W, 3] floats in [0, 1] or uint8."""
        if not self.enabled:
            return
        import torch

        video = torch.from_numpy(np.asarray(frames))
        if video.dtype != torch.uint8:
            video = (video.clamp(0, 1) * 255).round().to(torch.uint8)
        video = video.permute(0, 3, 1, 2).unsqueeze(0)  # [1, T, C, H, W]
        self.writer.add_video(tag, video, step, fps=fps)

    def log_text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = None
        self.enabled = False

"""Experiment tracking owned by the trainer: TensorBoard scalars and videos on rank 0, nothing elsewhere."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger("ds_distill")


class Tracker:
    """Writes scalars (`role/name`) and videos; a no-op off rank 0 or with `trackers: [none]`."""

    def __init__(self, log_dir: str | Path, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def log_video(self, tag: str, frames: np.ndarray, step: int, fps: int = 8) -> None:
        """frames: [T, H, W, 3] floats in [0, 1] or uint8."""
        if self.writer is None:
            return
        import torch

        video = torch.from_numpy(np.asarray(frames))
        if video.dtype != torch.uint8:
            video = (video.clamp(0, 1) * 255).round().to(torch.uint8)
        video = video.permute(0, 3, 1, 2).unsqueeze(0)  # [1, T, C, H, W]
        self.writer.add_video(tag, video, step, fps=fps)

    def log_text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

"""The one place that turns a role's `trainable` flag into requires_grad and train/eval mode."""
from __future__ import annotations

import torch


def apply_trainable(module: torch.nn.Module, trainable: bool) -> torch.nn.Module:
    """Trainable: all params require grad, train mode. Frozen: no grads, eval mode."""
    module.requires_grad_(trainable)
    module.train(trainable)
    return module

"""The one place that turns a role's `trainable` flag into requires_grad and train/eval mode."""
from __future__ import annotations

import torch

LORA_CONFIG_FILE = "lora_config.json"
"""Beside a LoRA role's DeepSpeed files in a checkpoint: its peft LoraConfig (what export rebuilds adapters from)."""


def apply_trainable(module: torch.nn.Module, trainable: bool) -> torch.nn.Module:
    """Trainable: all params require grad, train mode; a module with LoRA adapters trains only those (its base stays
    frozen). Frozen: no grads, eval mode."""
    adapters = set(lora_parameter_names(module)) if trainable else set()
    module.requires_grad_(trainable and not adapters)
    for n, p in module.named_parameters():
        if n in adapters:
            p.requires_grad_(True)
    module.train(trainable)
    return module


def lora_parameter_names(module: torch.nn.Module) -> list[str]:
    """Names of the module's adapter parameters (peft's `lora_` prefix); empty for a module without adapters."""
    if not getattr(module, "_hf_peft_config_loaded", False):
        return []
    from peft.tuners.lora import LoraModel

    return [n for n, _ in module.named_parameters() if LoraModel.prefix in n]

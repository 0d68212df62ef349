"""ds_distill: DeepSpeed ZeRO-3 distillation (DMD2) and finetuning for video diffusion transformers."""

__version__ = "0.1.0"

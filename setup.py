"""Packaging for ds_distill.

`DS_BUILD_NOISE_INJECTION=1 pip install .` compiles the fused noise-injection ops at install time
(CPU kernel always, CUDA kernel when torch has CUDA and nvcc is found); otherwise they JIT-build on
first use. See ds_distill/ops/README.md.
"""
import os

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.4,<=2.14.1",
    "deepspeed>=0.17,<0.20",
    "diffusers>=0.35,<0.43",
    "transformers>=4.50,<5.24",
    "accelerate>=1.0,<1.16",
    "safetensors>=0.4,<0.9",
    "pyarrow>=14,<27",
    "tensorboard>=2.14,<2.22",
    "pyyaml>=6,<7",
    "tqdm>=4.60",
    "ninja",
    "imageio>=2.30",
    "imageio-ffmpeg>=0.4.9",
    "psutil>=5.9",
    "peft>=0.15,<0.22",  # LoRA: diffusers' add_adapter / load_lora_weights
]


def _ext_modules():
    """Prebuilt op extensions when DS_BUILD_NOISE_INJECTION=1, else none (JIT at first use)."""
    if os.environ.get("DS_BUILD_NOISE_INJECTION", "0") != "1":
        return [], {}
    from ds_distill.ops.op_builder import install_time_extensions

    return install_time_extensions()


ext_modules, cmdclass = _ext_modules()

setup(
    name="ds_distill",
    version="0.1.0",
    description="DeepSpeed ZeRO-3 distillation (DMD2) and finetuning for video diffusion transformers (Wan2.1).",
    packages=find_packages(include=["ds_distill", "ds_distill.*"]),
    package_data={"ds_distill": ["ops/csrc/*"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest>=8", "pytest-timeout", "av>=12", "moviepy<2"], "wandb": ["wandb>=0.19.10,<0.31"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["ds-distill=ds_distill.cli:main"]},
)

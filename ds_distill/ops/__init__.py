"""Fused timestep-conditioned noise injection (CUDA kernel, C++ CPU kernel, PyTorch reference).

`add_noise` and `sde_step` pick the fastest backend that loads for the tensors' device; see README.md.
"""
from .noise_injection import add_noise, noise_op_backend, sde_step
from .reference import add_noise_reference, sde_step_reference, sigma_from_timestep

__all__ = [
    "add_noise",
    "add_noise_reference",
    "noise_op_backend",
    "sde_step",
    "sde_step_reference",
    "sigma_from_timestep",
]

"""DeepSpeed `OpBuilder`s for the fused noise-injection ops (CPU and CUDA kernels).

JIT: `Builder().load()` imports a prebuilt extension if `DS_BUILD_NOISE_INJECTION=1 pip install .` made one,
else compiles with ninja into torch's extension cache (`TORCH_EXTENSIONS_DIR` moves it) and caches the module.
Install time: setup.py calls `install_time_extensions()`. Nothing here needs ds_distill to be installed.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from deepspeed.ops.op_builder.builder import CUDAOpBuilder, installed_cuda_version
from deepspeed.ops.op_builder.cpu.builder import CPUOpBuilder

CSRC = Path(__file__).resolve().parent / "csrc"
BUILD_VAR = "DS_BUILD_NOISE_INJECTION"
# Architectures for install-time CUDA builds when TORCH_CUDA_ARCH_LIST is unset (CUDA 13 dropped < 7.5).
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0"


def extensions_root() -> str:
    """torch's JIT extension cache root, as torch.utils.cpp_extension computes it (without creating it)."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is not None:
        return root
    if getattr(torch.version, "hip", None):
        accelerator = "rocm" + torch.version.hip.replace(".", "")
    elif torch.version.cuda is not None:
        accelerator = "cu" + torch.version.cuda.replace(".", "")
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return os.path.join(get_default_build_root(), f"{python}_{accelerator}")


class _PrebuiltFirst:
    """`load()` that prefers the extension built at install time, then DeepSpeed's JIT path."""

    loaded_from = None  # "prebuilt" | "jit", set by load()

    def prebuilt_spec(self):
        """The import spec of the install-time extension, or None."""
        try:
            return importlib.util.find_spec(self.absolute_name())
        except (ImportError, ValueError):
            return None

    def load(self, verbose=False):
        if self.name in self._loaded_ops:  # DeepSpeed's per-process cache
            module = self._loaded_ops[self.name]
            self.loaded_from = "prebuilt" if module.__name__ == self.absolute_name() else "jit"
            return module
        if self.prebuilt_spec() is not None:
            try:
                module = importlib.import_module(self.absolute_name())
            except ImportError as err:  # built against another torch: rebuild instead
                self.error_log = f"prebuilt {self.absolute_name()} did not import ({err}); using JIT"
            else:
                self._loaded_ops[self.name] = module
                self.loaded_from = "prebuilt"
                return module
        module = self.jit_load(verbose)
        self.loaded_from = "jit"
        return module

    def jit_so_path(self) -> Path:
        """Where a JIT build of this op lands (torch's extension cache, honouring TORCH_EXTENSIONS_DIR)."""
        return Path(extensions_root()) / self.name / f"{self.name}.so"

    def jit_cache_state(self) -> str:
        """'cached' if a JIT build newer than every source exists, 'stale' if an older one does, else 'missing'."""
        so = self.jit_so_path()
        if not so.is_file():
            return "missing"
        newest_source = max(Path(p).stat().st_mtime for p in self.sources() + self._headers())
        return "cached" if so.stat().st_mtime >= newest_source else "stale"

    def _headers(self):
        return [str(p) for p in CSRC.glob("*.h")]


class NoiseInjectionCPUBuilder(_PrebuiltFirst, CPUOpBuilder):
    """C++ CPU kernel (OpenMP threads via at::parallel_for, AVX2 when the build machine has it)."""

    BUILD_VAR = BUILD_VAR
    NAME = "ds_distill_noise_injection_cpu"

    def __init__(self):
        super().__init__(name=self.NAME)

    def absolute_name(self):
        return "ds_distill.ops._noise_injection_cpu"

    def sources(self):
        return [str(CSRC / "noise_injection_cpu.cpp")]

    def include_paths(self):
        return [str(CSRC)]

    def cxx_args(self):
        # -ffp-contract=off keeps the reference's rounding (no FMA contraction); no -g: it doubles build time
        return [a for a in super().cxx_args() if a != "-g"] + ["-ffp-contract=off"]

    def is_compatible(self, verbose=False):
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            self.error_log = f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH"
            if verbose:
                self.warning(self.error_log)
            return False
        return super().is_compatible(verbose)


class NoiseInjectionCUDABuilder(_PrebuiltFirst, CUDAOpBuilder):
    """CUDA kernel (fp32/fp16/bf16/fp64, 16-byte vector loads); compiles with nvcc even without a GPU."""

    BUILD_VAR = BUILD_VAR
    NAME = "ds_distill_noise_injection_cuda"

    def __init__(self):
        super().__init__(name=self.NAME)

    def absolute_name(self):
        return "ds_distill.ops._noise_injection_cuda"

    def sources(self):
        return [str(CSRC / "noise_injection_cuda_binding.cpp"), str(CSRC / "noise_injection_cuda.cu")]

    def include_paths(self):
        return [str(CSRC)]

    def is_compatible(self, verbose=False):
        reason = self._incompatibility()
        if reason is not None:
            self.error_log = reason
            if verbose:
                self.warning(f"{self.NAME}: {reason}")
            return False
        return super().is_compatible(verbose)

    def _incompatibility(self):
        import torch
        from torch.utils import cpp_extension

        if torch.version.cuda is None:
            return f"torch {torch.__version__} is not a CUDA build"
        if getattr(torch.version, "hip", None):
            return "ROCm torch is not supported by this op"
        home = cpp_extension.CUDA_HOME
        if home is None:
            return "CUDA_HOME not found (set CUDA_HOME to a CUDA toolkit)"
        if not os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return f"CUDA_HOME={home} has no include/cuda_runtime.h (set CUDA_HOME to a CUDA toolkit)"
        try:
            major, minor = installed_cuda_version()
        except Exception as err:  # nvcc missing or unrunnable
            return str(err)
        if str(major) != torch.version.cuda.split(".")[0]:
            return f"nvcc is CUDA {major}.{minor} but torch was built with CUDA {torch.version.cuda}"
        return None

    def cxx_args(self):
        return [a for a in super().cxx_args() if a != "-g"] + ["-ffp-contract=off"]

    def nvcc_args(self):
        # DeepSpeed drops nvcc flags when JIT-building on a machine without a GPU; this op always has .cu
        # sources, so always pass them. No --use_fast_math: sigma's division must match the reference.
        major, minor = installed_cuda_version()
        std = "-std=c++20" if (major, minor) >= (12, 5) else "-std=c++17"
        try:
            threads = max(1, int(os.environ.get("DS_NVCC_THREADS", "")))
        except ValueError:
            threads = min(os.cpu_count() or 1, 8)
        return ["-O3", std, "-lineinfo", f"--threads={threads}"] + self.compute_capability_args()

    def compute_capability_args(self, cross_compile_archs=None):
        if not self.jit_mode and cross_compile_archs is None and "TORCH_CUDA_ARCH_LIST" not in os.environ:
            cross_compile_archs = DEFAULT_CUDA_ARCHS
        return super().compute_capability_args(cross_compile_archs)

    def filter_ccs(self, ccs):
        ccs = super().filter_ccs(ccs)
        try:
            cuda_major = installed_cuda_version()[0]
        except Exception:
            return ccs
        if cuda_major >= 13:
            kept = [cc for cc in ccs if (int(cc[0]), int(cc[1].split("+")[0])) >= (7, 5)]
            if len(kept) < len(ccs):
                self.warning(f"{self.NAME}: CUDA {cuda_major} cannot target compute capabilities below 7.5; "
                             f"dropped {['.'.join(cc) for cc in ccs if cc not in kept]}")
            return kept
        return ccs


def nvcc_version() -> str | None:
    """Release of the nvcc torch would use (e.g. '13.0'), or None."""
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return None
    try:
        out = subprocess.check_output([os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"), "-V"], text=True)
    except (OSError, subprocess.SubprocessError):
        return None
    words = out.split()
    return words[words.index("release") + 1].rstrip(",") if "release" in words else None


def _relative_sources(ext, root: Path):
    """setuptools wants sources relative to setup.py's directory (left absolute when outside it)."""
    def rel(source):
        path = Path(source)
        return str(path.relative_to(root)) if path.is_absolute() and path.is_relative_to(root) else source

    ext.sources = [rel(s) for s in ext.sources]
    return ext


def install_time_extensions():
    """(ext_modules, cmdclass) for setup.py when DS_BUILD_NOISE_INJECTION=1.

    The CPU kernel is always built; the CUDA kernel when torch has CUDA and nvcc is usable
    (TORCH_CUDA_ARCH_LIST picks the architectures, default DEFAULT_CUDA_ARCHS).
    """
    from torch.utils.cpp_extension import BuildExtension

    root = Path.cwd().resolve()
    extensions = []
    cpu = NoiseInjectionCPUBuilder()
    if not cpu.is_compatible(verbose=True):
        raise RuntimeError(f"{BUILD_VAR}=1 but the CPU op cannot be built: {cpu.error_log}")
    extensions.append(_relative_sources(cpu.builder(), root))
    cuda = NoiseInjectionCUDABuilder()
    if cuda.is_compatible(verbose=False):
        extensions.append(_relative_sources(cuda.builder(), root))
    else:
        print(f"[ds_distill] skipping the CUDA noise-injection op at install time: {cuda.error_log}")
    return extensions, {"build_ext": BuildExtension.with_options(use_ninja=True)}

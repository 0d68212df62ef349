"""`ds-distill report`: DeepSpeed's `ds_report` with ds_distill's ops as extra rows, then the toolchain
(torch, CUDA, nvcc, ninja) and the path live for each device type: the kernel, verified against the reference,
the reference it fell back to (and why), or the reference. A kernel that is prebuilt or in the JIT cache is
loaded and self-checked (as training does at first use); nothing is ever built. Exits 0.

Also runs as `python -m ds_distill.report`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import traceback

from ds_distill.errors import exit_on_user_error

CPU_BUILD_TIME = "~40 s"
CUDA_BUILD_TIME = "~2-3 min"
WIDTH = 33


def _row(name: str, value) -> None:
    print(name, "." * max(1, WIDTH - len(name)), value)


def _builders():
    from ds_distill.ops.op_builder import NoiseInjectionCPUBuilder, NoiseInjectionCUDABuilder

    return NoiseInjectionCPUBuilder(), NoiseInjectionCUDABuilder()


def ds_report_with_our_ops(builders, verbose: bool) -> None:
    """DeepSpeed's own op table and environment info, with our builders registered as extra ops."""
    import deepspeed.env_report as env_report

    missing = object()
    saved = {}
    try:
        for builder in builders:
            saved[builder.name] = (env_report.ALL_OPS.get(builder.name, missing),
                                   env_report.installed_ops.get(builder.name, missing))
            env_report.ALL_OPS[builder.name] = builder
            # "installed" in ds_report means prebuilt at install time
            env_report.installed_ops[builder.name] = builder.prebuilt_spec() is not None
        env_report.main(hide_operator_status=False, hide_errors_and_warnings=not verbose)
    finally:  # leave DeepSpeed's registries as they were
        for name, (op, installed) in saved.items():
            for table, value in ((env_report.ALL_OPS, op), (env_report.installed_ops, installed)):
                if value is missing:
                    table.pop(name, None)
                else:
                    table[name] = value


def _live(kind: str) -> str:
    """Load (prebuilt or cached: no build) and self-check the op as the first training call would."""
    from ds_distill.ops import noise_injection

    backend = noise_injection._select(kind)
    if backend.name == kind:
        return f"{kind} kernel ({backend.reason})"
    if "self-check" in backend.reason:
        return f"reference: the {kind} kernel FELL BACK ({backend.reason})"
    return f"reference ({backend.reason})"


def _kernel_state(kind: str, builder, build_time: str) -> str:
    """What the `kind` ('cpu'/'cuda') kernel is now, from this process's state and the caches."""
    from ds_distill.ops import noise_injection
    from ds_distill.ops.op_builder import extensions_root

    if kind in noise_injection._ops or builder.prebuilt_spec() is not None:
        return _live(kind)
    if not builder.is_compatible(verbose=False):
        return f"reference ({kind} op cannot be built here: {builder.error_log})"
    state = builder.jit_cache_state()
    if state == "cached":
        return _live(kind)
    if state == "stale":
        return f"{kind} kernel (needs JIT rebuild, sources changed, {build_time})"
    return f"{kind} kernel (needs JIT build, {build_time}, into {extensions_root()}; verifies itself at first use)"


def backend_now(device_type: str, builders) -> str:
    """The backend add_noise/sde_step would use for tensors on `device_type`, without building anything."""
    import torch

    from ds_distill.ops import noise_injection

    cpu_builder, cuda_builder = builders
    mode = noise_injection._mode()
    if mode == "reference":
        return f"reference ({noise_injection.ENV_VAR}=reference)"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "n/a (no CUDA device visible)"
        if mode == "cpu":
            return f"reference ({noise_injection.ENV_VAR}=cpu; the CPU kernel cannot take CUDA tensors)"
        return _kernel_state("cuda", cuda_builder, CUDA_BUILD_TIME)
    note = f" [{noise_injection.ENV_VAR}=cuda does not apply to CPU tensors]" if mode == "cuda" else ""
    return _kernel_state("cpu", cpu_builder, CPU_BUILD_TIME) + note


def _command_version(args) -> str | None:
    if shutil.which(args[0]) is None:
        return None
    try:
        return subprocess.check_output(args, text=True, stderr=subprocess.STDOUT, timeout=30).strip()
    except (OSError, subprocess.SubprocessError):
        return None


def toolchain_and_backends(builders) -> None:
    """torch / CUDA / nvcc / ninja versions, the extension cache, and the backend per device type."""
    import torch
    from torch.utils import cpp_extension

    from ds_distill.ops import noise_injection
    from ds_distill.ops.op_builder import extensions_root, nvcc_version

    print("-" * 60)
    print("ds_distill ops report")
    print("-" * 60)
    _row("torch", f"{torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only'} build)")
    cuda_available = torch.cuda.is_available()
    devices = torch.cuda.device_count() if cuda_available else 0
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(devices))
    _row("CUDA devices", f"{devices}" + (f" ({names})" if names else ""))
    home = cpp_extension.CUDA_HOME
    home_note = ""
    if home is not None and not os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        home_note = " (no include/cuda_runtime.h: set CUDA_HOME to the toolkit)"
    _row("CUDA_HOME (as torch sees it)", f"{home}{home_note}")
    _row("nvcc", nvcc_version() or "not found")
    _row("ninja", _command_version(["ninja", "--version"]) or "not found")
    _row("c++", (_command_version([os.environ.get("CXX", "c++"), "--version"]) or "not found").splitlines()[0])
    _row("extension cache", f"{extensions_root()}"
         + ("" if "TORCH_EXTENSIONS_DIR" in os.environ else " (TORCH_EXTENSIONS_DIR unset)"))
    _row(noise_injection.ENV_VAR, os.environ.get(noise_injection.ENV_VAR, "auto (unset)"))
    for builder in builders:
        compatible = builder.is_compatible(verbose=False)
        prebuilt = builder.prebuilt_spec() is not None
        detail = f"compatible: {'yes' if compatible else 'no (' + str(builder.error_log) + ')'}; " \
                 f"prebuilt: {'yes' if prebuilt else 'no'}; JIT cache: {builder.jit_cache_state()}"
        _row(builder.name, detail)
    _row("noise injection, cpu tensors", backend_now("cpu", builders))
    _row("noise injection, cuda tensors", backend_now("cuda", builders))
    print("-" * 60)


@exit_on_user_error
def main(argv=None) -> int:
    """Print the report; 0 even when an op is unavailable (the reference then runs)."""
    from ds_distill.cli import ArgumentParser

    parser = ArgumentParser(
        prog="ds-distill report",
        description="DeepSpeed's ds_report with ds_distill's ops added, then torch/CUDA/nvcc/ninja versions and "
        "the backend each op would use now (builds nothing).",
    )
    parser.add_argument("--no-ds-report", action="store_true", help="skip DeepSpeed's own table and environment info")
    parser.add_argument("--verbose", action="store_true", help="show DeepSpeed's compatibility warnings")
    args = parser.parse_args(argv)
    try:
        builders = _builders()
    except Exception as err:  # deepspeed missing or broken: nothing else can be reported
        print(f"[ERROR] cannot create the op builders: {type(err).__name__}: {err}")
        return 0
    sections = [] if args.no_ds_report else [lambda: ds_report_with_our_ops(builders, args.verbose)]
    sections.append(lambda: toolchain_and_backends(builders))
    for section in sections:
        try:
            section()
        except Exception:
            print("[ERROR] part of the report failed:")
            traceback.print_exc(file=sys.stdout)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

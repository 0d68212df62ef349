"""The CUDA noise-injection kernel compiles with nvcc on a machine without a GPU (and, with one, matches the reference).

The build goes through the op's DeepSpeed builder, into torch's extension cache, for a single architecture
(TORCH_CUDA_ARCH_LIST, default 9.0) to keep it to about a minute; a rebuild with unchanged sources is a no-op.
Skipped only where torch has no CUDA or no CUDA toolkit (nvcc + headers) is found.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.cuda_build

REPO = Path(__file__).resolve().parents[1]

BUILD = """
from ds_distill.ops.op_builder import NoiseInjectionCUDABuilder
builder = NoiseInjectionCUDABuilder()
assert builder.is_compatible(verbose=True), builder.error_log
module = builder.jit_load(verbose=True)
print("BUILT", module.__file__, sorted(n for n in dir(module) if not n.startswith("_")))
"""


def cuda_toolkit() -> str | None:
    """A CUDA toolkit directory with nvcc and headers: $CUDA_HOME / $CUDA_PATH, /usr/local/cuda, or nvcc's parent."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").exists() and (Path(home) / "include" / "cuda_runtime.h").exists():
            return home
    return None


def test_cuda_kernel_compiles():
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is a CPU-only build: .cu sources cannot be built")
    home = cuda_toolkit()
    if home is None:
        pytest.skip("no CUDA toolkit (bin/nvcc and include/cuda_runtime.h) found; set CUDA_HOME")
    env = dict(os.environ, CUDA_HOME=home, TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    result = subprocess.run([sys.executable, "-c", BUILD], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    built = [line for line in result.stdout.splitlines() if line.startswith("BUILT")]
    assert built, output[-3000:]
    for name in ("add_noise_fwd", "add_noise_bwd", "sde_fwd", "sde_bwd"):
        assert name in built[0]


# ---- on a machine with a GPU: the CUDA kernel against the reference ------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _tol(dtype):
    if dtype in (torch.float16, torch.bfloat16):
        return {"rtol": 1.6e-2, "atol": 1e-2}
    return {"rtol": 1e-6, "atol": 1e-6}


@pytest.fixture(scope="module")
def cuda_backend():
    from ds_distill.ops import noise_op_backend

    assert noise_op_backend("cuda") == "cuda"


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7,), (3, 5), (4, 16, 3, 8, 8), (2, 4, 9, 11), (3, 70001)], ids=str)
def test_cuda_kernel_matches_reference(cuda_backend, dtype, shape):
    from ds_distill.ops import add_noise, add_noise_reference, sde_step, sde_step_reference

    gen = torch.Generator(device="cuda").manual_seed(0)
    x0, eps, v = (torch.randn(shape, generator=gen, device="cuda").to(dtype) for _ in range(3))
    t = torch.linspace(0, 1000, shape[0], device="cuda")
    for kwargs in ({"shift": 3.0}, {"sigma_table": torch.linspace(1, 0, 1000)}):
        torch.testing.assert_close(add_noise(x0, eps, t, **kwargs), add_noise_reference(x0, eps, t, **kwargs),
                                   **_tol(dtype))
    st, sn = t / 1000, t / 2000
    for got, want in zip(sde_step(x0, v, st, sn, eps), sde_step_reference(x0, v, st, sn, eps)):
        torch.testing.assert_close(got, want, **_tol(dtype))
    # non-contiguous and misaligned inputs take the scalar path
    torch.testing.assert_close(add_noise(x0.flip(-1), eps, t), add_noise_reference(x0.flip(-1), eps, t),
                               **_tol(dtype))


@needs_gpu
def test_cuda_gradcheck_and_grads(cuda_backend):
    from ds_distill.ops import add_noise, sde_step

    x0, eps, v = (torch.randn(3, 2, 5, dtype=torch.float64, device="cuda", requires_grad=True) for _ in range(3))
    t = torch.tensor([0.0, 420.0, 1000.0], device="cuda")
    assert type(add_noise(x0, eps, t).grad_fn).__name__ == "_AddNoiseBackward"
    assert torch.autograd.gradcheck(lambda a, b: add_noise(a, b, t, shift=3.0), (x0, eps))
    st, sn = torch.tensor([0.9, 0.4, 0.05], device="cuda"), torch.tensor([0.6, 0.1, 0.0], device="cuda")
    assert torch.autograd.gradcheck(lambda a, b, c: sde_step(a, b, st, sn, c), (x0, v, eps))
    assert torch.autograd.gradcheck(lambda a, b: sde_step(a, b, st, None, None)[0], (x0, v))

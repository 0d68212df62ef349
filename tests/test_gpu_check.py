"""tools/gpu_check.sh --cpu-smoke: the real-scale DMD2 script of the GPU check, at tiny size on the CPU, so the
script cannot rot between GPU runs."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_cpu_smoke():
    env = dict(os.environ, PYTHON=sys.executable)
    out = subprocess.run(["bash", "tools/gpu_check.sh", "--cpu-smoke"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    lines = out.stdout.splitlines()
    for role in ("student", "teacher", "critic"):
        assert any(f"role {role}:" in ln and "params" in ln for ln in lines), text[-3000:]
        assert any(f"role {role}: peak memory over its forward calls" in ln for ln in lines), text[-3000:]
    for i in (1, 2, 3):
        assert any(f"iteration {i}:" in ln and " s, peak device memory " in ln for ln in lines), text[-3000:]
    assert "persistence threshold 0" in out.stdout

"""tools/gpu_check.sh --cpu-smoke: the real-scale DMD2 script of the GPU check, at tiny size on the CPU, so the
script cannot rot between GPU runs."""
import sys

from conftest import REPO, run_cli


def test_gpu_check_cpu_smoke():
    # run_cli drops the rendezvous variables the in-process one-rank group (dist_env) left in os.environ
    out = run_cli(["bash", "tools/gpu_check.sh", "--cpu-smoke"], cwd=REPO, env={"PYTHON": sys.executable}, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    lines = out.stdout.splitlines()
    for role in ("student", "teacher", "critic"):
        assert any(f"role {role}:" in ln and "params" in ln for ln in lines), text[-3000:]
        assert any(f"role {role}: peak memory over its forward calls" in ln for ln in lines), text[-3000:]
    for i in (1, 2, 3):
        assert any(f"iteration {i}:" in ln and " s, peak device memory " in ln for ln in lines), text[-3000:]
    assert "persistence threshold 0" in out.stdout

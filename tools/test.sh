#!/usr/bin/env bash
# Install ds_distill (+ test extras and the ssh/pdsh/iproute2 the two-host launch test needs) and run the tests.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -m slow` or `bash tools/test.sh tests/test_dmd2.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  bash tools/install_multihost_deps.sh || echo "note: multihost deps not installed; that test will skip"
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q "$@"

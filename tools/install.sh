#!/usr/bin/env bash
# Create .venv (if missing) and install ds_distill with the tested pins. Idempotent; ~3 minutes on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch from the registry would pull several GB.
python -m pip install -q "torch==2.14.1"
python -m pip install -q -r tools/requirements.txt
python -m pip install -q --no-deps -e .

#!/usr/bin/env python
"""ZeRO-3 checkpoint -> Diffusers safetensors directory, streamed (ds-distill convert; see ds_distill/export.py).

DeepSpeed's checkpoint files are pickles: convert only checkpoints that you (your own runs) wrote.
"""
import sys
from pathlib import Path

# Runs from a checkout without `pip install -e .` too.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ds_distill.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

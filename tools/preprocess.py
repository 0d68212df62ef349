#!/usr/bin/env python
"""Videos + captions JSON -> preprocessed parquet (same as `ds-distill preprocess`; see ds_distill/preprocess.py)."""
import sys
from pathlib import Path

# Runs from a checkout without `pip install -e .` too.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ds_distill.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

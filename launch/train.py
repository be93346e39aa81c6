#!/usr/bin/env python
"""DINO pretraining: ``python launch/train.py --config configs/quickstart.yaml [key=value ...]``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_xcit.train.entry import main  # noqa: E402

if __name__ == "__main__":
    main()

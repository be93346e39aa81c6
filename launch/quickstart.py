#!/usr/bin/env python
"""Quickstart: ``python launch/quickstart.py --data ../shared/data/cifar10.tar.gz``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_xcit.quickstart import main  # noqa: E402

if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Export frozen backbone features to sharded files with a manifest.

Options: ``python eval/export_features.py --help``; the code is ``ssl_xcit.evaluate.export``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ssl_xcit.evaluate.export import main  # noqa: E402

if __name__ == "__main__":
    main()

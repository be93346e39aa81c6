#!/usr/bin/env python
"""Linear probe of a frozen backbone (DINO protocol or a cached-feature grid).

Options: ``python eval/eval_linear.py --help``; the code is ``ssl_xcit.evaluate.linear``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ssl_xcit.evaluate.linear import main  # noqa: E402

if __name__ == "__main__":
    main()

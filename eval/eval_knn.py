#!/usr/bin/env python
"""Weighted k-NN evaluation of a frozen backbone (DINO protocol).

Options: ``python eval/eval_knn.py --help``; the code is ``ssl_xcit.evaluate.knn``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ssl_xcit.evaluate.knn import main  # noqa: E402

if __name__ == "__main__":
    main()

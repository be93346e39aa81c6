#!/usr/bin/env python
"""Top-1 / top-5 of an XCiT classifier on an ImageFolder val set. See ``python eval/eval_classification.py --help``; the code is ssl_xcit.evaluate.classification."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ssl_xcit.evaluate.classification import main  # noqa: E402

if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Copy detection on your own images: a seeded benchmark of edited copies, mAP and recall@1 per edit family.

Options: ``python eval/eval_copy_detection.py --help``; the code is ``ssl_xcit.evaluate.copy_detection``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ssl_xcit import cli  # noqa: E402

if __name__ == "__main__":
    cli.run("ssl_xcit.commands.copy_detection:main", prog="eval/eval_copy_detection.py")  # a known error: one line, exit status 2

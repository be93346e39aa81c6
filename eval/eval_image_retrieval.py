#!/usr/bin/env python
"""Image retrieval on revisited Oxford / Paris, DINO's protocol and flags: mAP Medium and Hard.

Options: ``python eval/eval_image_retrieval.py --help``; the code is ``ssl_xcit.evaluate.retrieval``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ssl_xcit import cli  # noqa: E402

if __name__ == "__main__":
    cli.run("ssl_xcit.commands.image_retrieval:main", prog="eval/eval_image_retrieval.py")  # a known error: one line, exit status 2

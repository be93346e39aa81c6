#!/usr/bin/env python
"""Linear segmentation probe of a frozen backbone's patch features (DINOv2's linear protocol), in mIoU.

Options: ``python eval/eval_segmentation.py --help``; the code is ``ssl_xcit.evaluate.segmentation``
(the command line: ``ssl_xcit.commands.segmentation``).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ssl_xcit import cli  # noqa: E402

if __name__ == "__main__":
    cli.run("ssl_xcit.commands.segmentation:main", prog="eval/eval_segmentation.py")

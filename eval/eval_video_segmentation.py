#!/usr/bin/env python
"""DAVIS video object segmentation by label propagation (DINO's protocol), scored in J&F.

Options: ``python eval/eval_video_segmentation.py --help``; the code is
``ssl_xcit.evaluate.video_segmentation`` (the command line: ``ssl_xcit.commands.video_segmentation``).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ssl_xcit import cli  # noqa: E402

if __name__ == "__main__":
    cli.run("ssl_xcit.commands.video_segmentation:main", prog="eval/eval_video_segmentation.py")

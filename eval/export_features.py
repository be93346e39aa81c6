#!/usr/bin/env python
"""Export frozen backbone features to sharded files with a manifest.

Options: ``python eval/export_features.py --help``; the code is ``ssl_xcit.evaluate.export``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ssl_xcit import cli  # noqa: E402
from ssl_xcit.commands.options import run_tool  # noqa: E402  (no torch: --help and bad input answer at once)


def main(argv: list[str]) -> object:
    return run_tool("export_features", argv)


if __name__ == "__main__":
    cli.run(main, prog="eval/export_features.py")  # a known error: one line, exit status 2 (--debug: traceback)

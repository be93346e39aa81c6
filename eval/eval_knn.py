#!/usr/bin/env python
"""Weighted k-NN evaluation of a frozen backbone (DINO protocol).

Options: ``python eval/eval_knn.py --help``; the code is ``ssl_xcit.evaluate.knn``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ssl_xcit import cli  # noqa: E402
from ssl_xcit.commands.options import run_tool  # noqa: E402  (no torch: --help and bad input answer at once)


def main(argv: list[str]) -> object:
    return run_tool("eval_knn", argv)


if __name__ == "__main__":
    cli.run(main, prog="eval/eval_knn.py")  # a known error: one line, exit status 2 (--debug: traceback)

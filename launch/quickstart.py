#!/usr/bin/env python
"""Quickstart: ``python launch/quickstart.py`` (CIFAR-10: ../shared/data/cifar10.tar.gz if present, else downloaded)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_xcit import cli  # noqa: E402
from ssl_xcit.commands.quickstart import main  # noqa: E402  (no torch until the work starts: --help answers at once)

if __name__ == "__main__":
    cli.run(main, prog="launch/quickstart.py")  # a known error: one line, exit status 2 (--debug: traceback)

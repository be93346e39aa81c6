#!/usr/bin/env python
"""Near-duplicate images of a feature export: groups, a thumbnail page, the list of files to keep.

Options: ``python eval/find_duplicates.py --help``; the code is ``ssl_xcit.evaluate.duplicates``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ssl_xcit import cli  # noqa: E402

if __name__ == "__main__":
    cli.run("ssl_xcit.commands.find_duplicates:main", prog="eval/find_duplicates.py")  # a known error: one line, exit status 2

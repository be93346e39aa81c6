#!/usr/bin/env python
"""Search a feature export with query images: ranked paths, cosine scores, a page of thumbnails.

Options: ``python eval/search.py --help``; the code is ``ssl_xcit.evaluate.search``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ssl_xcit import cli  # noqa: E402

if __name__ == "__main__":
    cli.run("ssl_xcit.commands.search:main", prog="eval/search.py")  # a known error: one line, exit status 2

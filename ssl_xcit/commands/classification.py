"""``eval/eval_classification.py`` / ``ssl-xcit-classify``: top-1 / top-5 of an XCiT classifier on an
ImageFolder validation set.

The parser and the checks are torch-free (:mod:`ssl_xcit.commands.options`); the work is
:func:`ssl_xcit.evaluate.classification.run`.
"""
from __future__ import annotations

import logging
from typing import Sequence

from ssl_xcit.commands import options

TOOL = "eval_classification"


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> dict:
    """The result dict (also printed as one line)."""
    args = options.parse(TOOL, None if argv is None else list(argv), prog=prog)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ssl_xcit.evaluate import classification
    cfg = options.settings(classification.ClassificationConfig, args)
    return options.in_own_words(TOOL, args, lambda: classification.run(cfg))

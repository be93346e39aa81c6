"""``eval/eval_knn.py`` / ``ssl-xcit-knn``: DINO's weighted k-NN of a frozen backbone.

The parser and the checks are torch-free (:mod:`ssl_xcit.commands.options`: ``--help`` and bad input
answer at once); the work is :func:`ssl_xcit.evaluate.knn.evaluate_knn`.
"""
from __future__ import annotations

from ssl_xcit.commands import options

TOOL = "eval_knn"


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    args = options.parse(TOOL, argv, prog=prog)
    from ssl_xcit.evaluate import knn
    return options.in_own_words(TOOL, args, lambda: knn.evaluate_knn(options.settings(knn.KnnSettings, args)))

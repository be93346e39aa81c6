"""``eval/eval_linear.py`` / ``ssl-xcit-linear``: a linear probe of a frozen backbone (DINO's protocol, or
the fast grid on cached features).

The parser and the checks are torch-free (:mod:`ssl_xcit.commands.options`); the work is
:func:`ssl_xcit.evaluate.linear.evaluate_linear`.
"""
from __future__ import annotations

from ssl_xcit.commands import options

TOOL = "eval_linear"


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    args = options.parse(TOOL, argv, prog=prog)
    from ssl_xcit.evaluate import linear
    return options.in_own_words(TOOL, args,
                                lambda: linear.evaluate_linear(options.settings(linear.LinearSettings, args)))

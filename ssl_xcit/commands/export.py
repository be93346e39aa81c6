"""``eval/export_features.py`` / ``ssl-xcit-export``: a frozen backbone's features of a folder of images
written to sharded files (resumable).

The parser and the checks are torch-free (:mod:`ssl_xcit.commands.options`); the work is
:func:`ssl_xcit.evaluate.export.export_folder`.
"""
from __future__ import annotations

from ssl_xcit.commands import options

TOOL = "export_features"


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    args = options.parse(TOOL, argv, prog=prog)   # dense_blocks parsed there: [3, 5, "final"]
    from ssl_xcit.evaluate import export
    settings = options.settings(export.ExportSettings, args, verify=not args.no_verify)
    return options.in_own_words(TOOL, args, lambda: export.export_folder(settings))

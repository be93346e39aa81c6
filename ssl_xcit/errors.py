"""The one base class of the errors a user can fix (bad input, a missing or foreign file, a
refused resume). Command lines print such an error as one line and exit with status 2
(:mod:`ssl_xcit.cli`); anything else is a bug and keeps its traceback.

This module imports nothing, so every layer (models, data, dino, train, evaluate) can raise it.
"""
from __future__ import annotations


class UserError(Exception):
    """An error whose message alone tells the user what to change. Subclass it (alongside a
    builtin such as ``ValueError`` where callers already catch that) for each kind of error."""

"""The inputs of the evaluation tools as Python sees them, without torch: their defaults, the
error a bad one raises and the checks of a number. The tools' command lines
(:mod:`ssl_xcit.commands.options`) and the library functions they call (:mod:`ssl_xcit.evaluate.knn`,
``.linear``, ``.datasets``, ``.knn_index``, ...) share them."""
from __future__ import annotations

import math

from ssl_xcit.errors import UserError

DEFAULT_KS = (10, 20, 100, 200)              # DINO's k-NN
DEFAULT_TEMPERATURE = 0.07
DEFAULT_LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
DEFAULT_WD_GRID = (0.0, 1e-5, 1e-4)
SPECIAL_CHECKPOINTS = ("pretrained", "none")  # eval_classification: published weights / random init


class EvalInputError(UserError, ValueError):
    """A bad evaluation input (an option's value, a data folder, a checkpoint path); the message
    says what to change. A ``ValueError`` too, which library callers already catch."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or folder named on the command line does not exist."""


def check_positive(value: int | float | None, name: str) -> None:
    """``value`` is ``None`` (not given) or a finite number above 0 (nan and inf are refused)."""
    if value is None:
        return
    if not math.isfinite(value):
        raise EvalInputError(f"{name} must be a finite number, got {value}")
    if value <= 0:
        raise EvalInputError(f"{name} must be positive, got {value}")


def check_non_negative(value: int | float | None, name: str) -> None:
    """``value`` is ``None`` (not given) or a finite number >= 0 (nan and inf are refused)."""
    if value is None:
        return
    if not math.isfinite(value):
        raise EvalInputError(f"{name} must be a finite number, got {value}")
    if value < 0:
        raise EvalInputError(f"{name} must be >= 0, got {value}")

"""The inputs of the evaluation tools as Python sees them, without torch: their defaults, the
error a bad one raises and the checks of a number. The tools' command lines
(:mod:`ssl_xcit.commands.options`) and the library functions they call (:mod:`ssl_xcit.evaluate.knn`,
``.linear``, ``.datasets``, ``.knn_index``, ...) share them."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from ssl_xcit.errors import SETTING, UserError, named

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
        raise named(EvalInputError, f"{SETTING} must be a finite number, got {value}", name)
    if value <= 0:
        raise named(EvalInputError, f"{SETTING} must be positive, got {value}", name)


def check_non_negative(value: int | float | None, name: str) -> None:
    """``value`` is ``None`` (not given) or a finite number >= 0 (nan and inf are refused)."""
    if value is None:
        return
    if not math.isfinite(value):
        raise named(EvalInputError, f"{SETTING} must be a finite number, got {value}", name)
    if value < 0:
        raise named(EvalInputError, f"{SETTING} must be >= 0, got {value}", name)


def default_workers(cap: int = 4) -> int:
    """Data-loading workers sized to the CPUs this process may use (its affinity, as PyTorch counts
    them): at most ``cap``, never more than the cores, so a 2-core machine gets 2 and no DataLoader
    warning that the workers exceed the suggested maximum."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # no affinity on this platform
        usable = os.cpu_count() or 1
    return max(1, min(cap, usable))


@dataclass
class SourceSettings:
    """What the tools that load a backbone and read images share (k-NN, linear probes, exports): the
    checkpoint (a file, or a model name for random weights), the images, and where the work runs.
    Their command lines fill it from the options of the same names (``ssl_xcit.commands``)."""

    checkpoint: str | None = None
    arch: str | None = None                # when the checkpoint does not name it
    checkpoint_key: str = "teacher"        # the network of a DINO checkpoint
    data_path: str | None = None           # a folder or .tar(.gz) archive
    crop_size: int = 224
    resize: int | None = None              # shorter side before the crop (None: DINO's ratio)
    batch_size: int | None = None          # None: the tool's default
    num_workers: int = field(default_factory=default_workers)
    device: str = "auto"
    output_dir: str | None = None          # None: the checkpoint's folder (outputs/<name> for a model name)
    seed: int = 0
    progress: bool = True

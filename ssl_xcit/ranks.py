"""Which process this is among a torchrun or SLURM job's, read from the environment: torch-free, so
a command knows it before torch loads (its stop messages) and a data module before any process group
exists (listing a folder comes first)."""
from __future__ import annotations

import os


def is_rank0() -> bool:
    """Rank 0 of a torchrun/SLURM job, or a plain process, by the ``RANK`` variable: known before
    any process group exists (listing a folder comes first), so only one rank draws progress bars."""
    return os.environ.get("RANK", "0") in ("", "0")

"""One training per output folder: rank 0 of a run holds ``<output_dir>/train.lock``.

The lock itself (flock + a heartbeat record naming its holder, taken over from a dead process) is
:class:`ssl_xcit.locks.OutputDirLock`, shared with make_shards; this module gives it the training's
file name and words, and keeps the names the training code and its tests import from here.
"""
from __future__ import annotations

import os

from ssl_xcit import locks
from ssl_xcit.locks import Holder, OutputDirLocked  # noqa: F401 (imported from here)

LOCK_NAME = "train.lock"


class OutputDirLock(locks.OutputDirLock):
    """:class:`ssl_xcit.locks.OutputDirLock` on ``<output_dir>/train.lock``: a second training in the same
    output folder is refused with the first one's host, pid and start time."""

    def __init__(self, folder: str | os.PathLike, heartbeat_s: float = 15.0, stale_after_s: float = 60.0,
                 wait_s: float | None = None) -> None:
        super().__init__(folder, LOCK_NAME, "training", "use another output_dir", heartbeat_s, stale_after_s,
                         wait_s)

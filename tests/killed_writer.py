"""A real atomic_write that is killed mid-write: the orphan temp file kill -9 leaves behind."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# opens its temp file, writes a little, says so, then waits to be killed
_WRITER = """
import sys, time
from ssl_xcit.atomic import atomic_write
def write(tmp):
    with open(tmp, "wb") as f:
        f.write(b"partial")
        f.flush()
        print("writing", flush=True)
        time.sleep(120)
atomic_write(sys.argv[1], write)
"""


def start_blocked_writer(target: str | os.PathLike) -> subprocess.Popen:
    """A process inside ``atomic_write(target, ...)`` with its temp file written to; kill it yourself."""
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "writing"
    return proc

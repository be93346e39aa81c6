"""Locks on files and folders, for work that must happen once: :func:`file_lock` (ranks sharing a cache
wait for the first to list, unpack or index, then reuse its result).

Neutral: the data layer, training and the tools all take these, so they live below every one of them.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def file_lock(lock_path: Path, remove: bool = True) -> Iterator[None]:
    """An exclusive ``flock`` so that ranks sharing a cache do a piece of work only once.

    With ``remove`` the lock file is deleted on exit, while still held. A waiter that then gets
    the lock of the deleted file notices (its inode is no longer the one at ``lock_path``) and
    locks the new file instead, so two processes never both believe they hold the lock.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the atomic rename alone
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fh = open(lock_path, "a")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                current = os.stat(lock_path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fh.fileno()).st_ino:
                break
        except BaseException:
            fh.close()
            raise
        fh.close()  # we locked a file another process removed: lock the new one
    try:
        yield
    finally:
        if remove:
            with contextlib.suppress(OSError):
                os.unlink(lock_path)
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()

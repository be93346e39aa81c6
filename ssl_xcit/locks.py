"""Locks on files and folders: :func:`file_lock` (ranks sharing a cache wait for the first to list,
unpack or index, then reuse its result) and :class:`OutputDirLock` (one writer per output folder: a
training's ``output_dir``, make_shards' DEST; a second one is refused with the first one's name).

Neutral: the data layer, training and the tools all take these, so they live below every one of them.

OutputDirLock: two processes writing the same files (a training's ``checkpoint.pth``, ``log.jsonl`` and
``config.yaml``; make_shards' shards and manifest) corrupt each other silently, so the second one must
be refused with the name of the first. The lock is an ``flock``
on the file, which the kernel drops when the process dies however it dies (kill -9 too), and the
file holds who took it (host, pid, start time) so that a refusal can say so.

``flock`` may not lock across hosts on a network file system. So the file is also a heartbeat: the
holder refreshes its modification time every ``heartbeat_s`` seconds from a daemon thread, and a
record naming another host counts as alive while that time moves. The cases:

* flock refused: a live process on this host (or a host where flock works) holds it -> refused;
* flock granted, no record: free (a clean exit truncates the record);
* flock granted, record of this host: its process is gone (kill -9, a crash) -> taken over;
* flock granted, record of another host (a SLURM requeue on a new node, or NFS without locks):
  taken over once its heartbeat has stopped for ``stale_after_s``; waits up to ``wait_s`` for that,
  and is refused while the heartbeat still moves.

The file is never deleted (deleting a lock file lets two processes lock two different inodes).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ssl_xcit.errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: file_lock relies on atomic renames alone; OutputDirLock needs flock
    fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def file_lock(lock_path: Path, remove: bool = True) -> Iterator[None]:
    """An exclusive ``flock`` so that ranks sharing a cache do a piece of work only once.

    With ``remove`` the lock file is deleted on exit, while still held. A waiter that then gets
    the lock of the deleted file notices (its inode is no longer the one at ``lock_path``) and
    locks the new file instead, so two processes never both believe they hold the lock.
    """
    if fcntl is None:  # not POSIX: rely on the atomic rename alone
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


class OutputDirLocked(UserError, RuntimeError):
    """Another process holds the folder; the message names it (host, pid, since) and what to do."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    since: float

    def describe(self) -> str:
        started = datetime.datetime.fromtimestamp(self.since).isoformat(sep=" ", timespec="seconds")
        return f"host {self.host}, pid {self.pid}, since {started}"


class OutputDirLock:
    """``acquire()`` or raise :class:`OutputDirLocked`; ``release()`` (idempotent) frees it.

    ``name``: the lock file in ``folder``; ``what``: the kind of work that holds it (a refusal says
    "in use by another <what>"); ``instead``: what else the refused user can do. After ``acquire``,
    ``took_over`` is the :class:`Holder` of a stale lock that was taken over (a dead process), else ``None``.
    """

    def __init__(self, folder: str | os.PathLike, name: str, what: str, instead: str, heartbeat_s: float = 15.0,
                 stale_after_s: float = 60.0, wait_s: float | None = None) -> None:
        self.path = Path(folder) / name
        self.what, self.instead = what, instead
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.wait_s = stale_after_s if wait_s is None else wait_s
        self.took_over: Holder | None = None
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "OutputDirLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                who = holder.describe() if holder else "a process that has not written its name yet"
                raise OutputDirLocked(f"{self.path.parent} is in use by another {self.what} ({who}; lock "
                                      f"{self.path}): wait for it to end, stop it, or {self.instead}") from None
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                # no flock on this file system: the record and its heartbeat are all there is
            self.took_over = self._check_record(fd)
            _write_holder(fd, Holder(socket.gethostname(), os.getpid(), time.time()))
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="output-dir-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _check_record(self, fd: int) -> Holder | None:
        """The stale holder to take over, ``None`` when free; raises while another host's run lives."""
        holder = _read_holder(fd)
        if holder is None or (holder.host == socket.gethostname() and holder.pid == os.getpid()):
            return None
        if holder.host == socket.gethostname():
            return holder      # flock granted: that process is gone
        deadline = time.monotonic() + self.wait_s
        while True:
            silent_s = time.time() - os.fstat(fd).st_mtime
            if silent_s >= self.stale_after_s:
                return holder
            if time.monotonic() + 1.0 > deadline:
                raise OutputDirLocked(
                    f"{self.path.parent} is in use by another {self.what} ({holder.describe()}; alive "
                    f"{silent_s:.0f}s ago by lock {self.path}): wait for it to end or stop it; if it is gone "
                    f"(this file system may not lock across hosts), retry after {self.stale_after_s:.0f}s "
                    "of silence or delete the lock file")
            time.sleep(1.0)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass   # a heartbeat that fails must not stop training; the flock still holds

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        try:
            os.ftruncate(self._fd, 0)    # no record: the next run starts without a takeover notice
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> Holder | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "null")
        return Holder(str(data["host"]), int(data["pid"]), float(data["since"])) if data else None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None    # empty, half-written or foreign: nobody we could name


def _write_holder(fd: int, holder: Holder) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": holder.host, "pid": holder.pid, "since": holder.since}).encode(), 0)
    os.fsync(fd)

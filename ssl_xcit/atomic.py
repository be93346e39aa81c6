"""Atomic file writes: a crash mid-write must never leave a truncated checkpoint behind.

What is guaranteed, for every file written here (checkpoints, manifests, results):

* readers see the old file or the new one, never half of one (temp file in the same folder,
  fsync, rename);
* a full disk raises ``OSError(ENOSPC, filename=<the target>)`` (one line on the command line:
  "no space left on the device writing PATH"), not torch's "enforce fail at inline_container.cc ...
  unexpected pos"; the temp file is removed and the old file is left as it was;
* a writer killed mid-write (kill -9, OOM killer, power loss) leaves its temp file
  ``.<name>.<host>.<pid>.<random>.tmp``; the next write to the same target removes the temp files of
  writers on this host (and PID namespace) whose process is gone (never a live writer's; a file from
  another host or container is left, its process cannot be checked from here);
* a new file gets the mode a plain ``open()`` would give it under the umask (0644 under umask 022);
* a folder that cannot be written (no permission, a read-only file system) raises
  :class:`NotWritableError` naming the folder (one line on the command line), not a temp file's name.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import Any, Callable

from ssl_xcit.errors import UserError

TMP_SUFFIX = ".tmp"
# Temp files named by the former scheme (tempfile.mkstemp: 8 random characters, no writer) are
# removed only when nobody has written to them for this long: their writer cannot be checked.
LEGACY_TMP_AGE_S = 3600.0
_NAME_STEM_MAX = 150  # keeps ".<stem>.<host>.<pid>.<random>.tmp" under the 255-byte name limit


class DiskFullError(UserError, OSError):
    """No space left (ENOSPC, or EDQUOT: quota exceeded) while writing ``filename``: the target, not
    the temp file. A :class:`UserError`, so command lines print it as one line."""

    def __init__(self, target: str | os.PathLike, err_no: int = errno.ENOSPC) -> None:
        super().__init__(err_no, os.strerror(err_no), str(target))

    def __str__(self) -> str:
        what = "no space left on the device" if self.errno == errno.ENOSPC else self.strerror.lower()
        return f"{what} writing {self.filename} (the previous file, if any, is unchanged)"


# a folder files cannot be created in: no permission, or a read-only file system
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class NotWritableError(UserError, OSError):
    """Files cannot be created in ``filename``, a folder (no permission, a read-only file system). A
    :class:`UserError`: one line naming the folder, whichever file was about to be written in it."""

    def __init__(self, folder: str | os.PathLike, err_no: int = errno.EACCES) -> None:
        super().__init__(err_no, os.strerror(err_no), str(folder))

    def __str__(self) -> str:
        return (f"cannot write in {self.filename}: {self.strerror.lower()}; give another folder or make "
                "this one writable")


def check_writable(folder: str | os.PathLike) -> None:
    """Raise :class:`NotWritableError` unless files can be created in ``folder`` or, when it does not
    exist yet, in the nearest folder above it (where it would be made); creates nothing that stays.
    For command lines, to find a read-only output folder before the work rather than after it."""
    folder = Path(folder).expanduser().absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        os.remove(_create_temp(existing / ".ssl_xcit-write-check"))
    except OSError as err:
        if err.errno in _NOT_WRITABLE:
            raise NotWritableError(folder, err.errno) from err
        raise


def _host() -> str:
    """This machine (and, on Linux, its PID namespace: containers that share a host name but not their
    process ids must not judge each other's writers)."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"
    try:
        ns = re.sub(r"\D", "", os.readlink("/proc/self/ns/pid"))
    except OSError:
        ns = ""
    return f"{host}-{ns}" if ns else host


def _stem(path: Path) -> str:
    return path.name[:_NAME_STEM_MAX]


def _temp_pattern(stem_re: str) -> re.Pattern[str]:
    """``.<stem>.<host>.<pid>.<random>.tmp``; the host has no dots, so the name parses from the right.
    ``stem_re``: the escaped stem of one target, or ``.+`` for any."""
    return re.compile(rf"\.(?P<stem>{stem_re})\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]+{TMP_SUFFIX}")


def _legacy_pattern(stem_re: str) -> re.Pattern[str]:
    """``tempfile.mkstemp``'s ``.<stem>.<8 chars>.tmp``, the scheme before writers were named."""
    return re.compile(rf"\.(?P<stem>{stem_re})\.[a-z0-9_]{{8}}{TMP_SUFFIX}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_orphans(path: str | os.PathLike) -> list[Path]:
    """Remove the temp files of dead writers of ``path`` (this host's writers whose process is gone,
    and former-scheme temp files untouched for an hour); returns what was removed."""
    path = Path(path)
    stem = _stem(path)
    pattern, legacy = _temp_pattern(re.escape(stem)), _legacy_pattern(re.escape(stem))
    host, me = _host(), os.getpid()
    removed = []
    try:
        names = [n for n in os.listdir(path.parent) if n.startswith(f".{stem}.") and n.endswith(TMP_SUFFIX)]
    except OSError:
        return removed
    for name in names:
        cand = path.parent / name
        m = pattern.fullmatch(name)
        try:
            if m:
                pid = int(m.group("pid"))
                dead = m.group("host") == host and pid != me and not _pid_alive(pid)
            else:
                dead = bool(legacy.fullmatch(name)) and time.time() - cand.lstat().st_mtime > LEGACY_TMP_AGE_S
            if dead:
                cand.unlink()
                removed.append(cand)
        except OSError:  # removed meanwhile by someone else, or not ours to remove
            continue
    return removed


def remove_orphans_in(folder: str | os.PathLike) -> list[Path]:
    """:func:`remove_orphans` for every target in ``folder`` that has temp files."""
    folder = Path(folder)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    any_temp, any_legacy = _temp_pattern(".+"), _legacy_pattern(".+")
    targets = set()
    for name in names:
        m = any_temp.fullmatch(name) or any_legacy.fullmatch(name)
        if m:
            targets.add(m.group("stem"))
    return [p for t in sorted(targets) for p in remove_orphans(folder / t)]


def _create_temp(path: Path) -> str:
    """A new, empty temp file next to ``path``, named after its writer; created like ``open(..., 'w')``
    would (mode 0666 less the umask), not 0600 as ``tempfile.mkstemp`` makes it."""
    prefix = f".{_stem(path)}.{_host()}.{os.getpid()}."
    for _ in range(100):
        tmp = path.parent / f"{prefix}{secrets.token_hex(4)}{TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return str(tmp)
    raise FileExistsError(errno.EEXIST, "no free temp file name", str(path.parent / prefix))


def _no_space_errno(err: BaseException, tmp: str) -> int | None:
    """ENOSPC / EDQUOT when ``err`` (or what caused it) is a full disk, else ``None``.

    Python's own writes raise ``OSError(ENOSPC)``. torch's writer does not keep the errno: a full
    disk is a ``RuntimeError`` ("unexpected pos ...", "iostream error", "file write failed"). Then one
    more small write to the temp file asks the file system itself: it fails with ENOSPC when the disk
    is full, and succeeds (nothing is claimed) when the cause was something else.
    """
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    text = str(err).lower()
    if not isinstance(err, RuntimeError) or not any(
            s in text for s in ("unexpected pos", "iostream error", "write failed", "no space left")):
        return None
    try:
        with open(tmp, "ab", buffering=0) as f:
            f.write(b"\0" * (1 << 16))
            os.fsync(f.fileno())
    except OSError as probe:
        if probe.errno in (errno.ENOSPC, errno.EDQUOT):
            return probe.errno
    return None


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temp file in the target folder, fsync it, then rename.

    The rename is atomic on POSIX file systems, so readers see the old file or the new one,
    never half of one. The temp file lives in the same folder so the rename never crosses devices.
    Temp files of dead writers of the same target are removed first; a full disk raises
    :class:`DiskFullError` (an ``OSError`` naming ``path``) after removing the temp file, and a folder
    that cannot be written (no permission, a read-only file system) :class:`NotWritableError` naming it.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_orphans(path)
        tmp = _create_temp(path)
    except OSError as err:   # a read-only folder or file system: name the folder, not a temp file
        if err.errno in _NOT_WRITABLE:
            raise NotWritableError(path.parent, err.errno) from err
        raise
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        full = _no_space_errno(err, tmp) if isinstance(err, Exception) else None
        try:
            os.remove(tmp)  # the link itself if the writer replaced it by one
        except FileNotFoundError:
            pass
        if full is not None:
            raise DiskFullError(path, full) from err
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    import torch  # here, not at module level: command lines import this module and start fast
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def _write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    return atomic_write(path, _write)


class NotJSONError(ValueError):
    """A value JSON cannot hold (NaN, an infinity): Python's ``json`` would write ``NaN``/``Infinity``,
    which no JSON reader accepts. Reaching it is a bug: a tool checks its numbers before it writes."""


def _first_non_finite(obj: Any, where: str = "") -> tuple[str, float] | None:
    """``(path, value)`` of the first NaN or infinity in ``obj`` (``history[3].train_loss``), or ``None``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "the value", obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _first_non_finite(value, f"{where}[{key}]" if isinstance(key, int) else
                                  f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> Path:
    """``obj`` as JSON through :func:`atomic_write_text`: the project's one JSON writer.

    Strict JSON only (``allow_nan=False``): a NaN or an infinity raises :class:`NotJSONError` naming
    the file and the key, and nothing is written, rather than a file no JSON reader can parse.
    """
    try:
        text = json.dumps(obj, indent=indent, allow_nan=False)
    except ValueError as err:
        key, value = _first_non_finite(obj) or ("a value", float("nan"))
        raise NotJSONError(f"not writing {path}: {key} is {value}, which JSON cannot hold") from err
    return atomic_write_text(path, text)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file, streamed (about 1 s per GB): the identity of a checkpoint a run starts from
    or an export reads, and of each file an export writes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

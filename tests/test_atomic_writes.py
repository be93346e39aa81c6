"""Atomic writes: a full disk is one clear error naming the target and leaves nothing behind; a killed
writer's temp file is removed by the next write to the same target (a live writer's never); files get
the mode a plain open() would give them under the umask.

The disk-full tests write through a temp file that is a symlink to ``/dev/full``: every write to it
fails with the kernel's real ENOSPC, so torch raises exactly the error it raises on a full disk
("[enforce fail at inline_container.cc:672] . unexpected pos ..." for large objects, "basic_ios::clear:
iostream error" for small ones) without filling a disk (no loop device or tmpfs mount here).
"""
from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from killed_writer import start_blocked_writer
from ssl_xcit.cli import describe
from ssl_xcit import atomic

REPO = Path(__file__).resolve().parents[1]
DEV_FULL = Path("/dev/full")
needs_dev_full = pytest.mark.skipif(not DEV_FULL.exists(), reason="no /dev/full on this system")


def _leftovers(folder: Path, target: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != target)


def _save_into_dev_full(monkeypatch) -> None:
    """Make torch.save's file (the atomic temp file) a symlink to /dev/full, then save for real."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        os.remove(f)
        os.symlink(DEV_FULL, f)
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)


@needs_dev_full
@pytest.mark.parametrize("numel", [10, 2_000_000], ids=["small", "large"])
def test_disk_full_in_torch_save_is_a_clear_enospc_error(tmp_path, monkeypatch, numel):
    target = tmp_path / "checkpoint.pth"
    target.write_bytes(b"previous checkpoint")
    _save_into_dev_full(monkeypatch)
    with pytest.raises(OSError) as info:
        atomic.atomic_torch_save({"w": torch.zeros(numel)}, target)
    err = info.value
    assert err.errno == errno.ENOSPC and err.filename == str(target)
    assert describe(err).startswith(f"no space left on the device writing {target} ")
    assert "inline_container" not in str(err) and "no space left" in str(err)
    assert target.read_bytes() == b"previous checkpoint"  # the old file is untouched
    assert _leftovers(tmp_path, target.name) == []  # no temp file (or link) left


@needs_dev_full
def test_disk_full_in_a_text_write_names_the_target(tmp_path):
    target = tmp_path / "knn.json"

    def write(tmp: str) -> None:
        os.remove(tmp)
        os.symlink(DEV_FULL, tmp)
        with open(tmp, "w") as f:
            f.write("{}" * 10000)
    with pytest.raises(OSError) as info:
        atomic.atomic_write(target, write)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert not target.exists() and _leftovers(tmp_path, target.name) == []


def test_other_write_errors_are_not_called_a_full_disk(tmp_path):
    def write(tmp: str) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    with pytest.raises(RuntimeError, match="unexpected pos"):  # a normal file: the disk is not full
        atomic.atomic_write(tmp_path / "x.pth", write)
    assert list(tmp_path.iterdir()) == []


def test_temp_files_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "checkpoint.pth"
    dead = start_blocked_writer(target)
    dead.send_signal(signal.SIGKILL)
    dead.wait(timeout=30)
    orphans = _leftovers(tmp_path, target.name)
    assert len(orphans) == 1 and orphans[0].endswith(".tmp")  # what kill -9 leaves today
    live = start_blocked_writer(target)
    try:
        live_tmp = set(_leftovers(tmp_path, target.name)) - set(orphans)
        assert len(live_tmp) == 1
        atomic.atomic_write_text(target, "new")
        assert target.read_text() == "new"
        assert set(_leftovers(tmp_path, target.name)) == live_tmp  # the orphan is gone, the live one kept
        assert str(live.pid) in next(iter(live_tmp))  # the temp file names its writer
    finally:
        live.kill()
        live.wait(timeout=30)


def test_other_targets_are_not_cleaned(tmp_path):
    dead = start_blocked_writer(tmp_path / "a.pth")
    dead.kill()
    dead.wait(timeout=30)
    orphan = _leftovers(tmp_path, "none")
    atomic.atomic_write_text(tmp_path / "b.json", "{}")
    assert _leftovers(tmp_path, "b.json") == orphan


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_files_get_the_mode_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain", "w"):
            pass
        atomic.atomic_write_text(tmp_path / "result.json", "{}")
        atomic.atomic_torch_save({"x": torch.ones(2)}, tmp_path / "checkpoint.pth")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert (tmp_path / "plain").stat().st_mode & 0o777 == want
    assert (tmp_path / "result.json").stat().st_mode & 0o777 == want
    assert (tmp_path / "checkpoint.pth").stat().st_mode & 0o777 == want


def test_former_scheme_temp_files_are_removed_once_stale(tmp_path):
    """Temp files of the former naming (mkstemp, no writer in the name; what kill -9 left before)
    are removed when untouched for an hour; a fresh one may still be written to and is kept."""
    stale, fresh = tmp_path / ".checkpoint.pth.k3_9x0ab.tmp", tmp_path / ".checkpoint.pth.q1w2e3r4.tmp"
    for p in (stale, fresh):
        p.write_bytes(b"partial")
    hour_ago = os.stat(stale).st_mtime - atomic.LEGACY_TMP_AGE_S - 60
    os.utime(stale, (hour_ago, hour_ago))
    atomic.atomic_write_text(tmp_path / "checkpoint.pth", "new")
    assert _leftovers(tmp_path, "checkpoint.pth") == [fresh.name]


_ON_TINY_DISK = textwrap.dedent("""
    import errno, os, sys, torch
    from ssl_xcit.atomic import atomic_torch_save
    folder = sys.argv[1]
    target = os.path.join(folder, "checkpoint.pth")
    with open(target, "wb") as f:
        f.write(b"previous")
    try:
        atomic_torch_save({"w": torch.zeros(1_000_000)}, target)  # 4 MB on a 1 MiB file system
    except OSError as err:
        assert err.errno == errno.ENOSPC and err.filename == target, (err.errno, err.filename)
        assert open(target, "rb").read() == b"previous" and os.listdir(folder) == ["checkpoint.pth"]
        print("ok:", err)
""")


def test_a_real_full_disk(tmp_path):
    """The same on a real 1 MiB tmpfs, mounted in a private user and mount namespace (skipped where
    unprivileged namespaces or mounts are not allowed)."""
    import shutil
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    folder = tmp_path / "tiny"
    folder.mkdir()
    script = f'mount -t tmpfs -o size=1m tmpfs {folder} || exit 77; exec "$0" -c "$1" {folder}'
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, sys.executable, _ON_TINY_DISK],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    if proc.returncode == 77 or (proc.returncode == 1 and "unshare" in proc.stderr):
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0 and "ok: no space left on the device writing" in proc.stdout, proc.stderr[-2000:]


def test_the_json_writer_refuses_nan_and_infinity(tmp_path):
    """json.dumps writes NaN and Infinity by default, which no JSON reader parses: the project's
    writer refuses them, names the key, and writes nothing (an older file stays as it was)."""
    import json

    from ssl_xcit.atomic import NotJSONError, atomic_write_json
    target = tmp_path / "linear.json"
    atomic_write_json(target, {"top1": 10.0, "history": [{"train_loss": 2.3}]}, indent=2)
    before = target.read_text()
    assert json.loads(before)["history"][0]["train_loss"] == 2.3
    for bad, where in (({"history": [{"train_loss": 2.3}, {"train_loss": float("nan")}]}, "history[1].train_loss"),
                       ({"selected": {"weight_decay": float("inf")}}, "selected.weight_decay"),
                       ([1.0, float("-inf")], "[1]")):
        with pytest.raises(NotJSONError, match=rf"not writing .*linear\.json: {re.escape(where)} is "):
            atomic_write_json(target, bad)
        assert target.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linear.json"]     # no temp file left


@pytest.mark.parametrize("err_no, words", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")])
def test_a_folder_that_cannot_be_written_is_named_in_one_line(tmp_path, monkeypatch, err_no, words):
    """A read-only file system was a traceback (OSError EROFS is no PermissionError) and no permission
    named a temp file (.x.json.<host>.<pid>.<random>.tmp): both now name the folder, in one line."""
    from conftest import make_read_only
    out = tmp_path / "out"
    out.mkdir()
    make_read_only(monkeypatch, out, err_no)
    for target, folder in ((out / "x.json", out), (out / "new" / "x.json", out / "new")):
        with pytest.raises(atomic.NotWritableError) as info:
            atomic.atomic_write_text(target, "{}")
        assert describe(info.value) == (f"cannot write in {folder}: {words}; give another folder or make this one "
                                        "writable")
        assert isinstance(info.value, OSError) and info.value.errno == err_no
    with pytest.raises(atomic.NotWritableError, match=f"cannot write in {out / 'a' / 'b'}: {words}"):
        atomic.check_writable(out / "a" / "b")       # checked where it would be made; nothing is made
    atomic.check_writable(tmp_path / "elsewhere")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and list(out.iterdir()) == []
    assert describe(OSError(errno.EROFS, "Read-only file system", str(out))) == f"{out}: Read-only file system"

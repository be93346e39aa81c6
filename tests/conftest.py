"""Shared fixtures: real CIFAR-10 images from ../shared/data, unpacked once per machine."""
from __future__ import annotations

import builtins
import errno
import io
import os
import sys
import tarfile
from pathlib import Path

import pytest
import torch

# One intra-op thread: the suite's tensors are small, several tests run 2-3 processes at once on a
# 2-core machine, and OpenMP threads spinning against each other made small ops 10x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # launch/ and eval/ scripts import as modules in tests

CIFAR_TAR = Path(os.environ.get("SSL_XCIT_CIFAR_TAR", REPO.parent / "shared" / "data" / "cifar10.tar.gz"))
CACHE = Path(os.environ.get("SSL_XCIT_TEST_CACHE", "/tmp/ssl_xcit_test_cache"))


def _unpack_cifar() -> Path:
    dest = CACHE / "cifar10"
    done = dest / ".complete"
    if not done.exists():
        if not CIFAR_TAR.exists():
            pytest.skip(f"real CIFAR-10 archive not found at {CIFAR_TAR}")
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(CIFAR_TAR) as tar:
            tar.extractall(dest, filter="data")
        done.touch()
    # the archive may hold train/ val/ at its top or under one folder
    for cand in [dest, *[p for p in dest.iterdir() if p.is_dir()]]:
        if (cand / "train").is_dir() and (cand / "val").is_dir():
            return cand
    raise RuntimeError(f"no train/ and val/ folders found under {dest}")


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """The full real CIFAR-10 in ImageFolder layout: ``<root>/train/<class>/*.jpg``, ``<root>/val/...``."""
    return _unpack_cifar()


def make_subset(root: Path, out: Path, per_class_train: int, per_class_val: int) -> Path:
    """A small ImageFolder copy (symlinks) of CIFAR-10 with the first N images of each class."""
    for split, n in (("train", per_class_train), ("val", per_class_val)):
        for cls_dir in sorted((root / split).iterdir()):
            if not cls_dir.is_dir():
                continue
            target = out / split / cls_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for img in sorted(cls_dir.iterdir())[:n]:
                link = target / img.name
                if not link.exists():
                    link.symlink_to(img)
    return out


@pytest.fixture(scope="session")
def cifar_small(cifar_root: Path, tmp_path_factory) -> Path:
    """CIFAR-10 with 20 train and 10 val images per class (200 / 100 images)."""
    return make_subset(cifar_root, tmp_path_factory.mktemp("cifar_small"), 20, 10)


def make_read_only(monkeypatch, folder: Path, err_no: int = errno.EROFS) -> None:
    """Make ``folder`` (and everything below it) behave as on a read-only file system for this test:
    creating a file or folder in it, or opening one there for writing, fails with ``err_no``. (The
    suite may run as root, for whom permission bits do not stop a write, so chmod cannot be used.)"""
    folder = Path(folder).absolute()

    def inside(path) -> bool:
        try:
            return Path(os.fsdecode(path)).absolute().is_relative_to(folder)
        except TypeError:    # a file descriptor
            return False

    def refuse(path):
        raise OSError(err_no, os.strerror(err_no), os.fsdecode(path))
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def fake_open(file, mode="r", *args, **kwargs):
        if inside(file) and any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if inside(path) and not os.path.isdir(path):
            refuse(path)
        return real_mkdir(path, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)       # Path.open / write_text
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)

"""resolve_data_path (folders, tar archives into a cache) and the offline part of download_cifar10."""
from __future__ import annotations

import io
import os
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import conftest
from ssl_xcit.data import sources
from ssl_xcit.data.folders import ImageFiles
from ssl_xcit.data.sources import MARKER, download_cifar10, resolve_data_path


def _png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (value, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def _make_tar(path: Path, files: dict[str, bytes], mode: str = "w:gz") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


TREE = {"train/cat/0.png": _png_bytes(10), "train/dog/1.png": _png_bytes(20), "val/cat/2.png": _png_bytes(30)}


def test_folder_is_returned_as_is(tmp_path: Path):
    (tmp_path / "train").mkdir()
    assert resolve_data_path(tmp_path) == tmp_path.resolve()
    assert resolve_data_path(str(tmp_path), cache_dir=tmp_path / "unused") == tmp_path.resolve()
    assert not (tmp_path / "unused").exists()


def test_missing_path_and_unsupported_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing.tar")):
        resolve_data_path(tmp_path / "missing.tar")
    zipped = tmp_path / "data.zip"
    zipped.write_bytes(b"PK")
    with pytest.raises(ValueError, match="data.zip.*not a supported archive"):
        resolve_data_path(zipped)
    fake = tmp_path / "fake.tar.gz"
    fake.write_bytes(b"not a tar at all")
    with pytest.raises(ValueError, match="fake.tar.gz is not a readable tar archive"):
        resolve_data_path(fake, cache_dir=tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]


@pytest.mark.parametrize("name, mode", [("ds.tar.gz", "w:gz"), ("ds.tgz", "w:gz"), ("ds.tar", "w")])
def test_archive_extracted_once_into_cache(tmp_path: Path, name, mode, monkeypatch):
    archive = _make_tar(tmp_path / name, TREE, mode)
    cache = tmp_path / "cache"
    root = resolve_data_path(archive, cache_dir=cache, progress=False)
    st = archive.stat()
    assert root == cache / f"ds-{st.st_size}-{st.st_mtime_ns}"
    assert (root / MARKER).exists()
    assert (root / "train" / "dog" / "1.png").read_bytes() == TREE["train/dog/1.png"]
    assert ImageFiles(root / "train", progress=False).classes == ["cat", "dog"]

    monkeypatch.setattr(sources.tarfile, "open", lambda *a, **k: pytest.fail("re-extracted a cached archive"))
    assert resolve_data_path(archive, cache_dir=cache) == root
    assert not list(cache.glob(".*tmp-*"))


def test_single_top_folder_is_descended_and_changed_archive_gets_new_cache(tmp_path: Path):
    archive = _make_tar(tmp_path / "wrapped.tar.gz", {f"imagenet/{k}": v for k, v in TREE.items()})
    cache = tmp_path / "cache"
    root = resolve_data_path(archive, cache_dir=cache, progress=False)
    assert root.name == "imagenet" and (root / "train" / "cat" / "0.png").exists()

    _make_tar(archive, {f"imagenet/{k}": v for k, v in TREE.items()} | {"imagenet/train/cat/9.png": _png_bytes(1)})
    os.utime(archive, ns=(1, 1))
    root2 = resolve_data_path(archive, cache_dir=cache, progress=False)
    assert root2 != root and (root2 / "train" / "cat" / "9.png").exists()


def test_archive_without_train_is_refused_and_not_cached(tmp_path: Path):
    archive = _make_tar(tmp_path / "flat.tar.gz", {"a/x.png": _png_bytes(1), "b/y.png": _png_bytes(2)})
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"flat.tar.gz has no train/ folder.*a/, b/"):
        resolve_data_path(archive, cache_dir=cache, progress=False)
    assert [p.name for p in cache.iterdir()] == [p.name for p in cache.glob(".*.lock")]


def test_unsafe_member_is_refused(tmp_path: Path):
    archive = _make_tar(tmp_path / "evil.tar", {"train/cat/0.png": _png_bytes(1), "../escaped.txt": b"x"}, "w")
    cache = tmp_path / "sub" / "cache"
    with pytest.raises(ValueError, match="unsafe member"):
        resolve_data_path(archive, cache_dir=cache, progress=False)
    assert not (tmp_path / "sub" / "escaped.txt").exists() and not (cache / "escaped.txt").exists()
    assert not list(cache.glob("evil-*"))


def test_default_cache_dir_follows_ssl_xcit_home(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SSL_XCIT_HOME", str(tmp_path / "home"))
    archive = _make_tar(tmp_path / "ds.tar.gz", TREE)
    root = resolve_data_path(archive, progress=False)
    assert root.parent == tmp_path / "home" / "data"
    monkeypatch.delenv("SSL_XCIT_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert sources.default_cache_dir() == tmp_path / "user" / ".cache" / "ssl_xcit" / "data"


def test_concurrent_callers_extract_once(tmp_path: Path, monkeypatch):
    archive = _make_tar(tmp_path / "ds.tar.gz", TREE)
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(sources.tarfile, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(
        resolve_data_path(archive, cache_dir=tmp_path / "cache", progress=False))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1 and len(opened) == 1


def test_real_cifar_subset_archive(cifar_small: Path, tmp_path: Path):
    archive = tmp_path / "cifar_small.tar.gz"
    with tarfile.open(archive, "w:gz", dereference=True) as tar:  # real JPEGs, archived under one top-level folder
        tar.add(cifar_small, arcname="cifar_small")
    root = resolve_data_path(archive, cache_dir=tmp_path / "cache", progress=False)
    assert root.name == "cifar_small" and root.parent.parent == tmp_path / "cache"
    train = ImageFiles(root / "train", progress=False)
    assert len(train) == 200 and train.classes == list(sources.CIFAR10_CLASSES)
    img, label, _ = train[57]
    assert img.size == (32, 32) and img.mode == "RGB"
    original = Image.open(cifar_small / "train" / train.classes[label] / Path(train.samples[57][0]).name)
    assert np.array_equal(np.asarray(img), np.asarray(original.convert("RGB")))


@pytest.mark.heavy
def test_real_cifar_archive(tmp_path: Path):
    if not conftest.CIFAR_TAR.exists():
        pytest.skip(f"real CIFAR-10 archive not found at {conftest.CIFAR_TAR}")
    root = resolve_data_path(conftest.CIFAR_TAR, cache_dir=tmp_path, progress=False)
    train, val = ImageFiles(root / "train", progress=False), ImageFiles(root / "val", progress=False)
    assert len(train) == 50_000 and len(val) == 10_000
    assert train.classes == val.classes == list(sources.CIFAR10_CLASSES)
    img, label, _ = train[123]
    assert img.size == (32, 32) and img.mode == "RGB"
    assert train.classes[label] == train.path(123).parent.name


class _FakeCIFAR10:
    """Stands in for torchvision's CIFAR10: deterministic arrays, records how it was called."""

    calls: list[tuple[str, bool, bool]] = []

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        type(self).calls.append((root, train, download))
        n = 12 if train else 5
        rng = np.random.default_rng(0 if train else 1)
        self.data = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        self.targets = [int(t) for t in rng.integers(0, 10, size=n)]
        self.classes = list(sources.CIFAR10_CLASSES)


def test_download_cifar10_writes_png_imagefolder(tmp_path: Path, monkeypatch):
    import torchvision.datasets
    _FakeCIFAR10.calls = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _FakeCIFAR10)
    out = download_cifar10(tmp_path / "dl", progress=False)
    assert out == (tmp_path / "dl" / "cifar10").resolve()
    assert [(train, dl) for _, train, dl in _FakeCIFAR10.calls] == [(True, True), (False, True)]

    for split, train in (("train", True), ("val", False)):
        ref = _FakeCIFAR10(str(tmp_path), train=train)
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(sources.CIFAR10_CLASSES)
        files = sorted((out / split).glob("*/*.png"))
        assert len(files) == len(ref.data)
        for i, (arr, target) in enumerate(zip(ref.data, ref.targets)):
            path = out / split / ref.classes[target] / f"{i:05d}.png"
            assert np.array_equal(np.asarray(Image.open(path)), arr)  # PNG: lossless, pixel-exact

    ds = ImageFiles(out / "train", progress=False)
    ref = _FakeCIFAR10(str(tmp_path), train=True)
    assert [ds.classes[t] for t in ds.targets] == [ref.classes[ref.targets[int(Path(p).stem)]] for p, _ in ds.samples]

    _FakeCIFAR10.calls = []
    assert download_cifar10(tmp_path / "dl", progress=False) == out
    assert _FakeCIFAR10.calls == []  # already converted: nothing fetched again


def test_download_cifar10_failure_leaves_nothing_half_done(tmp_path: Path, monkeypatch):
    import torchvision.datasets

    class Broken(_FakeCIFAR10):
        def __init__(self, root, train=True, download=False):
            if not train:
                raise RuntimeError("network down")
            super().__init__(root, train, download)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Broken)
    with pytest.raises(RuntimeError, match="network down"):
        download_cifar10(tmp_path, progress=False)
    assert not (tmp_path / "cifar10").exists() and not list(tmp_path.glob(".cifar10.tmp-*"))


# --- issue 9: truncated archives, lock files ---------------------------------------------------
def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _member_offsets(data: bytes) -> dict[str, int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: m.offset for m in tar}


@pytest.mark.parametrize("cut", ["at_member", "mid_data", "no_end_blocks"])
def test_truncated_plain_tar_is_refused_naming_it_and_not_cached(tmp_path: Path, cut):
    """A plain .tar cut short (a copy stopped half-way) was unpacked and cached as complete,
    train/ present and val/ silently missing (issue 9, item 8)."""
    full = _tar_bytes(TREE)
    offsets = _member_offsets(full)
    end_of_members = offsets["val/cat/2.png"] + 512 + 512  # header + one data block
    cut_at = {"at_member": offsets["val/cat/2.png"],       # val/ header never arrives
              "mid_data": offsets["val/cat/2.png"] + 512 + 10,
              "no_end_blocks": end_of_members}[cut]
    archive = tmp_path / "cut.tar"
    archive.write_bytes(full[:cut_at])
    cache = tmp_path / "cache"
    with pytest.raises(sources.ArchiveError, match=r"cut\.tar.*(truncated|ends)"):
        resolve_data_path(archive, cache_dir=cache, progress=False)
    assert not list(cache.iterdir()), "nothing may be cached from a truncated archive"
    # the complete archive is still accepted
    archive.write_bytes(full)
    root = resolve_data_path(archive, cache_dir=cache, progress=False)
    assert (root / "val" / "cat" / "2.png").read_bytes() == TREE["val/cat/2.png"]


def test_truncated_tar_inside_complete_gzip_is_refused(tmp_path: Path):
    import gzip
    full = _tar_bytes(TREE)
    archive = tmp_path / "cut.tar.gz"
    archive.write_bytes(gzip.compress(full[:_member_offsets(full)["val/cat/2.png"]]))
    with pytest.raises(sources.ArchiveError, match=r"cut\.tar\.gz"):
        resolve_data_path(archive, cache_dir=tmp_path / "cache", progress=False)


def test_truncated_gzip_is_one_clear_error(tmp_path: Path):
    import gzip
    packed = gzip.compress(_tar_bytes(TREE))
    archive = tmp_path / "cut.tar.gz"
    archive.write_bytes(packed[:-6])  # the gzip trailer (CRC, length) is cut
    with pytest.raises(sources.ArchiveError, match=r"cut\.tar\.gz"):
        resolve_data_path(archive, cache_dir=tmp_path / "cache", progress=False)


def test_failed_extraction_leaves_no_lock_file(tmp_path: Path):
    fake = tmp_path / "fake.tar.gz"
    fake.write_bytes(b"not a tar at all")
    cache = tmp_path / "cache"
    with pytest.raises(ValueError):
        resolve_data_path(fake, cache_dir=cache, progress=False)
    assert not list(cache.iterdir()), f"left behind: {[p.name for p in cache.iterdir()]}"
    archive = _make_tar(tmp_path / "ds.tar.gz", TREE)
    resolve_data_path(archive, cache_dir=cache, progress=False)
    assert not list(cache.glob(".*.lock"))


def test_archive_error_is_one_line_through_cli(tmp_path: Path, capsys):
    from ssl_xcit import cli
    archive = tmp_path / "cut.tar"
    full = _tar_bytes(TREE)
    archive.write_bytes(full[:_member_offsets(full)["val/cat/2.png"]])
    with pytest.raises(SystemExit) as exc:
        cli.run(lambda argv: resolve_data_path(archive, cache_dir=tmp_path / "c", progress=False), [], prog="t")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "cut.tar" in err

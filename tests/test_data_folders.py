"""ImageFiles: layout detection, listing (and its cache), corrupt files, collate, seeded augmentation."""
from __future__ import annotations

import io
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader
from torchvision import transforms as T

from ssl_xcit.data.folders import IMAGE_EXTENSIONS, Batch, ImageFiles, collate_skip_corrupt, load_listing
from ssl_xcit.data.sampler import ResumableDistributedSampler


def _save(path: Path, size: int = 24, mode: str = "RGB", fmt: str | None = None, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=mode)
    img.save(path, format=fmt)
    return path


def _truncated_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


@pytest.fixture(autouse=True)
def _strict_pil(monkeypatch):
    # another module setting this globally would hide truncated files
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)


# --- listing and layout -------------------------------------------------------------------------
def test_class_layout_on_real_cifar(cifar_small: Path):
    ds = ImageFiles(cifar_small / "train", progress=False)
    expected_classes = sorted(p.name for p in (cifar_small / "train").iterdir() if p.is_dir())
    assert ds.classes == expected_classes and len(ds.classes) == 10
    assert ds.class_to_idx == {c: i for i, c in enumerate(expected_classes)}
    assert len(ds) == 200 and not ds.is_flat
    for path, label in ds.samples:
        assert Path(path).parent.name == ds.classes[label]
    assert [p for p, _ in ds.samples] == sorted(p for p, _ in ds.samples)  # deterministic order
    img, label, index = ds[37]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (32, 32)
    assert label == ds.targets[37] and index == 37


def test_nested_class_folders_and_extension_rules(tmp_path: Path):
    root = tmp_path / "data"
    _save(root / "b_cls" / "x.JPG", fmt="JPEG")
    _save(root / "b_cls" / "deeper" / "y.Png", fmt="PNG")
    _save(root / "a_cls" / "z.webp", fmt="WEBP")
    _save(root / "a_cls" / "w.tiff", fmt="TIFF")
    _save(root / "a_cls" / ".hidden.jpg", fmt="JPEG")          # hidden: ignored
    (root / "a_cls" / "notes.txt").write_text("not an image")   # wrong extension: ignored
    (root / "empty_cls").mkdir()
    ds = ImageFiles(root, progress=False)
    assert ds.classes == ["a_cls", "b_cls", "empty_cls"]      # empty class kept: indices stay stable
    rel = [os.path.relpath(p, root) for p, _ in ds.samples]
    assert rel == ["a_cls/w.tiff", "a_cls/z.webp", "b_cls/deeper/y.Png", "b_cls/x.JPG"]
    assert ds.targets == [0, 0, 1, 1]


def test_flat_layout_gets_label_minus_one(tmp_path: Path):
    root = tmp_path / "flat"
    _save(root / "c.png", fmt="PNG")
    _save(root / "a.jpeg", fmt="JPEG")
    _save(root / "sub" / "b.bmp", fmt="BMP")  # images directly in root -> flat, subfolders included
    _save(root / "sub" / "ünï.ppm", fmt="PPM")
    ds = ImageFiles(root, progress=False)
    assert ds.is_flat and ds.classes == [] and ds.class_to_idx == {}
    assert [os.path.relpath(p, root) for p, _ in ds.samples] == ["a.jpeg", "c.png", "sub/b.bmp", "sub/ünï.ppm"]
    assert ds.targets == [-1, -1, -1, -1]
    assert ds[2][1] == -1 and ds[3][0].size == (24, 24)


def test_missing_and_empty_folders_give_one_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        ImageFiles(tmp_path / "nope")
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError) as err:
        ImageFiles(empty)
    assert str(empty) in str(err.value) and ".jpg" in str(err.value) and ".webp" in str(err.value)
    f = tmp_path / "file.jpg"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="file.jpg"):
        ImageFiles(f)


def test_listing_cache_is_reused_and_invalidated(tmp_path: Path, monkeypatch):
    root = tmp_path / "data"
    for i in range(3):
        _save(root / "cls" / f"{i}.png", fmt="PNG")
    cache = tmp_path / "cache"
    first = load_listing(root, cache_dir=cache, progress=False)
    assert len(list(cache.glob("listing-*.json"))) == 1

    import ssl_xcit.data.folders as folders
    calls = []
    real_scan = folders.scan_images
    monkeypatch.setattr(folders, "scan_images", lambda *a, **k: calls.append(1) or real_scan(*a, **k))
    again = load_listing(root, cache_dir=cache, progress=False)
    assert calls == [] and again.files == first.files and again.labels == first.labels

    _save(root / "cls" / "sub" / "new.png", fmt="PNG")  # a new folder changes cls/'s mtime
    os.utime(root / "cls", ns=(0, 0))                    # make sure the mtime differs even on coarse clocks
    fresh = load_listing(root, cache_dir=cache, progress=False)
    assert calls == [1] and "cls/sub/new.png" in fresh.files and len(fresh.files) == 4
    ds = ImageFiles(root, listing_cache_dir=cache, progress=False)
    assert len(ds) == 4 and calls == [1]


# --- corrupt files ------------------------------------------------------------------------------
def test_corrupt_files_are_skipped_counted_and_warned_once(tmp_path: Path, caplog):
    root = tmp_path / "data"
    _save(root / "cls_a" / "0.jpg", fmt="JPEG")
    bad_trunc = _truncated_jpeg(root / "cls_a" / "1.jpg")
    _save(root / "cls_b" / "2.png", mode="L", fmt="PNG")
    bad_text = root / "cls_b" / "3.jpg"
    bad_text.write_text("this is a text file renamed to .jpg\n")
    _save(root / "cls_b" / "4.png", mode="RGBA", fmt="PNG")

    ds = ImageFiles(root, transform=T.ToTensor(), progress=False)
    names = [Path(p).name for p, _ in ds.samples]
    assert names == ["0.jpg", "1.jpg", "2.png", "3.jpg", "4.png"]
    with caplog.at_level(logging.WARNING, logger="ssl_xcit.data.folders"):
        assert ds[1] is None and ds[3] is None
        assert ds[1] is None  # second read: no second warning
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2
    assert str(bad_trunc) in warned[0] and "truncated" in warned[0].lower()
    assert str(bad_text) in warned[1] and "identify" in warned[1].lower()
    for i in (0, 2, 4):  # grey and RGBA images come out as RGB
        assert ds[i][0].shape == (3, 24, 24)

    loader = DataLoader(ds, batch_size=5, shuffle=False, collate_fn=collate_skip_corrupt)
    (batch,) = list(loader)
    assert isinstance(batch, Batch) and batch.crops is None
    assert batch.n_skipped == 2 and len(batch) == 3
    assert batch.indices.tolist() == [0, 2, 4] and batch.indices.dtype == torch.long
    assert batch.labels.tolist() == [0, 1, 1] and batch.labels.dtype == torch.long
    expected = torch.stack([T.ToTensor()(Image.open(ds.samples[i][0]).convert("RGB")) for i in (0, 2, 4)])
    assert torch.equal(batch.images, expected)


def test_collate_multicrop_empty_and_bad_outputs():
    crops = lambda k: [torch.full((3, 8, 8), float(k)), torch.full((3, 4, 4), -float(k))]  # noqa: E731
    batch = collate_skip_corrupt([(crops(1), 0, 10), None, (crops(2), 1, 11), (crops(3), 0, 12)])
    assert batch.images is None and len(batch.crops) == 2
    assert batch.crops[0].shape == (3, 3, 8, 8) and batch.crops[1].shape == (3, 3, 4, 4)
    assert batch.crops[0][:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0]
    assert batch.crops[1][:, 0, 0, 0].tolist() == [-1.0, -2.0, -3.0]
    assert batch.indices.tolist() == [10, 11, 12] and batch.n_skipped == 1

    empty = collate_skip_corrupt([None, None])
    assert empty.is_empty and empty.n_skipped == 2 and empty.images is None and empty.crops is None
    assert empty.labels.shape == (0,)

    moved = batch.to("cpu")
    assert torch.equal(moved.crops[1], batch.crops[1]) and moved.n_skipped == 1

    with pytest.raises(TypeError, match="Tensor"):
        collate_skip_corrupt([(Image.new("RGB", (4, 4)), 0, 0)])
    with pytest.raises(ValueError, match="crop position 0"):
        collate_skip_corrupt([([torch.zeros(3, 8, 8)], 0, 0), ([torch.zeros(3, 6, 6)], 0, 1)])
    with pytest.raises(ValueError, match="index 1"):
        collate_skip_corrupt([(crops(1), 0, 0), ([torch.zeros(3, 8, 8)], 0, 1)])


def test_bad_indices_are_clear_errors(tmp_path: Path):
    _save(tmp_path / "d" / "a.png", fmt="PNG")
    ds = ImageFiles(tmp_path / "d", progress=False)
    with pytest.raises(IndexError, match="out of range for 1 images"):
        ds[1]
    with pytest.raises(TypeError, match="sample_seed must be an int"):
        ds[(0, "x")]
    with pytest.raises(TypeError, match="index must be an int"):
        ds[(0, 1, 2)]
    with pytest.raises(TypeError, match="index must be an int"):
        ds[0.5]


# --- seeded augmentation ------------------------------------------------------------------------
class _PyAndNumpyNoise:
    """Draws from Python's and NumPy's global RNGs, which the seeding must also cover."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + random.random() + float(np.random.rand())


class _TwoCrops:
    def __init__(self) -> None:
        aug = [T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4, 0.1), T.ToTensor(), _PyAndNumpyNoise()]
        self.big = T.Compose([T.RandomResizedCrop(16, scale=(0.3, 1.0))] + aug)
        self.small = T.Compose([T.RandomResizedCrop(8, scale=(0.05, 0.3))] + aug)

    def __call__(self, img):
        return [self.big(img), self.small(img)]


def test_seed_fixes_crops_and_leaves_global_rng_alone(cifar_small: Path):
    ds = ImageFiles(cifar_small / "train", transform=_TwoCrops(), progress=False)
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    a = ds[(5, 1234)][0]
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.manual_seed(2), random.seed(2), np.random.seed(2)  # other global state: same crops
    torch_state2, py_state2, np_state2 = torch.get_rng_state(), random.getstate(), np.random.get_state()
    b = ds[(5, 1234)][0]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # the caller's RNG streams are untouched by the seeded call
    assert torch.equal(torch.get_rng_state(), torch_state2) and random.getstate() == py_state2
    assert np.array_equal(np.random.get_state()[1], np_state2[1])
    assert not torch.equal(torch_state, torch_state2)
    c = ds[(5, 1235)][0]
    assert not torch.equal(a[0], c[0])
    u, v = ds[5][0], ds[5][0]  # unseeded: the transform really is random
    assert not torch.equal(u[0], v[0])


def test_seeded_crops_same_with_two_workers_or_none(cifar_small: Path):
    ds = ImageFiles(cifar_small / "train", transform=_TwoCrops(), progress=False)
    sampler = ResumableDistributedSampler(len(ds), batch_size_per_rank=8, seed=3)
    sampler.set_epoch(1)

    def run(workers: int) -> list[Batch]:
        loader = DataLoader(ds, batch_size=8, sampler=sampler, num_workers=workers,
                            collate_fn=collate_skip_corrupt)
        return [b for _, b in zip(range(3), loader)]

    torch.manual_seed(0)
    serial = run(0)
    torch.manual_seed(99)
    parallel = run(2)
    pairs = list(sampler)[:24]
    assert [b.indices.tolist() for b in serial] == [[i for i, _ in pairs[k:k + 8]] for k in (0, 8, 16)]
    for s, p in zip(serial, parallel):
        assert torch.equal(s.indices, p.indices) and s.n_skipped == p.n_skipped == 0
        for cs, cp in zip(s.crops, p.crops):
            assert torch.equal(cs, cp)
    # and in reverse order, one by one: crops depend on the (index, seed) pair only
    for k, (idx, seed) in reversed(list(enumerate(pairs[:8]))):
        crops = ds[(idx, seed)][0]
        assert torch.equal(crops[0], serial[0].crops[0][k]) and torch.equal(crops[1], serial[0].crops[1][k])


def test_extensions_constant_covers_the_required_formats():
    required = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
    assert set(IMAGE_EXTENSIONS) == required


# --- issue 9, item 9: 16-bit images ------------------------------------------------------------
def _png16(path: Path, arr: np.ndarray) -> Path:
    """A 16-bit PNG written byte by byte (grey or RGB), independent of PIL's writer."""
    import struct
    import zlib
    h, w = arr.shape[:2]
    colour_type = 2 if arr.ndim == 3 else 0
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("kind", ["grey_png", "rgb_png", "grey_pil_I"])
def test_16bit_images_are_scaled_not_saturated(tmp_path: Path, kind):
    """16-bit greys were clipped at 255: 99.6% of a ramp's pixels became white (issue 9, item 9)."""
    from ssl_xcit.data.folders import load_rgb
    rng = np.random.default_rng(0)
    if kind == "rgb_png":
        arr = rng.integers(0, 65536, (16, 16, 3)).astype(np.uint16)
        path = _png16(tmp_path / "x.png", arr)
        expected = np.round(arr / 257.0)
    else:
        arr = rng.integers(0, 65536, (16, 16)).astype(np.uint16)
        if kind == "grey_png":
            path = _png16(tmp_path / "x.png", arr)
        else:  # PIL's 32-bit integer mode holding 16-bit values (what older Pillow gave for such PNGs)
            path = tmp_path / "x.tif"
            Image.fromarray(arr.astype(np.int32), mode="I").save(path)
        expected = np.repeat(np.round(arr / 257.0)[..., None], 3, axis=2)
    got = np.asarray(load_rgb(str(path))).astype(np.float64)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1, "16-bit values must map to 8 bits by 255/65535"
    assert (got == 255).mean() < 0.01


def test_listing_cache_is_built_once_when_ranks_start_together(tmp_path: Path, monkeypatch):
    """Ranks (here threads) listing one folder at the same time: the first scans, the others wait
    on the cache's lock and reuse its result instead of listing 1.28M files each."""
    import threading
    import time
    from ssl_xcit.data import folders
    for c in ("a", "b"):
        for i in range(3):
            _save(tmp_path / "data" / c / f"{i}.png", size=4)
    real_scan, scans = folders.scan_images, []

    def slow_scan(*args, **kwargs):
        scans.append(1)
        time.sleep(0.3)   # long enough for every other thread to arrive while the first scans
        return real_scan(*args, **kwargs)
    monkeypatch.setattr(folders, "scan_images", slow_scan)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        load_listing(tmp_path / "data", cache_dir=tmp_path / "cache", progress=False))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(scans) == 1 and len(results) == 4 and all(r.files == results[0].files for r in results)
    assert not list((tmp_path / "cache").glob("*.lock"))


def test_listing_cache_sees_a_file_added_within_the_same_clock_tick(tmp_path: Path):
    """Folder mtimes move in coarse ticks: a file added right after the scan can leave the mtime
    as the cache recorded it. Simulated by restoring the mtime; the new image must still be seen."""
    root = tmp_path / "data"
    _save(root / "cls" / "0.png", fmt="PNG")
    cache = tmp_path / "cache"
    assert load_listing(root, cache_dir=cache, progress=False).files == ["cls/0.png"]
    before = os.stat(root / "cls").st_mtime_ns
    _save(root / "cls" / "1.png", fmt="PNG")
    os.utime(root / "cls", ns=(before, before))
    assert load_listing(root, cache_dir=cache, progress=False).files == ["cls/0.png", "cls/1.png"]

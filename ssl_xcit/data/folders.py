"""Image folders as a torch Dataset: fast listing, corrupt files skipped and counted, seeded augmentation.

Layout detection (one rule, decided from the root's immediate entries):

* **class layout** (ImageFolder): no image file sits directly in ``root`` and at least one immediate
  sub-folder holds images (at any depth). Every immediate sub-folder is a class, sorted by name;
  label = index in that sorted list. Images are found recursively below each class folder. A class
  folder without images is kept (with a warning) so that train/ and val/ agree on class indices.
* **flat layout**: otherwise (images directly in ``root``). Every image below ``root`` (recursively)
  gets label ``-1`` and ``classes`` is empty.

Entries whose name starts with ``.`` are ignored (hidden files, listing caches, ``.complete``
markers). Symbolic links are followed. The listing is sorted (by class, then relative path) so
every process sees the same index -> file mapping.

Corrupt files: ``__getitem__`` returns ``None`` and logs one warning per file per process;
:func:`collate_skip_corrupt` drops the ``None`` items and reports how many it dropped, so one bad
JPEG in 1.28M never stops a run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ssl_xcit.atomic import atomic_write_json
# IMAGE_EXTENSIONS, load_rgb, read_size and run_seeded are this module's names too (callers import them here)
from ssl_xcit.ranks import is_rank0
from ssl_xcit.data.common import (DECODE_ERRORS, IMAGE_EXTENSIONS, load_rgb, parse_index,  # noqa: F401
                                  read_size, run_seeded, selection)
from ssl_xcit.locks import file_lock

logger = logging.getLogger(__name__)

_LISTING_CACHE_VERSION = 1


def _normalise_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    if not exts:
        raise ValueError("extensions must name at least one file extension, e.g. ('.jpg', '.png')")
    return exts


def _is_image(name: str, extensions: tuple[str, ...]) -> bool:
    return not name.startswith(".") and name.lower().endswith(extensions)


def _scan_tree(top: str, extensions: tuple[str, ...], dirs_seen: dict[str, int],
               visited: set[str]) -> list[str]:
    """All image paths below ``top`` (absolute), recording each folder's mtime for cache checks."""
    found: list[str] = []
    stack = [top]
    while stack:
        current = stack.pop()
        real = os.path.realpath(current)
        if real in visited:  # a symlink loop or two links to the same folder
            continue
        visited.add(real)
        try:
            dirs_seen[current] = os.stat(current).st_mtime_ns
            with os.scandir(current) as it:
                entries = list(it)
        except OSError as err:
            raise OSError(f"cannot list image folder {current}: {err}") from err
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    stack.append(entry.path)
                elif entry.is_file() and _is_image(entry.name, extensions):
                    found.append(entry.path)
            except OSError:  # a dangling symlink: not an image we can read, not worth failing for
                continue
    return found


@dataclass(frozen=True)
class Listing:
    """The result of scanning a root: relative paths, labels, class names, scanned folder mtimes."""

    files: list[str]        # paths relative to root, sorted
    labels: list[int]
    classes: list[str]
    dir_mtimes: dict[str, int]  # relative folder -> st_mtime_ns, to detect additions/removals


def scan_images(root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                progress: bool | None = None) -> Listing:
    """List the images below ``root`` following the layout rule of this module."""
    root_str = os.path.abspath(os.fspath(root))
    exts = _normalise_extensions(extensions)
    if not os.path.exists(root_str):
        raise FileNotFoundError(f"image folder {root_str} does not exist")
    if not os.path.isdir(root_str):
        raise NotADirectoryError(f"image folder {root_str} is not a directory")

    dirs_seen: dict[str, int] = {root_str: os.stat(root_str).st_mtime_ns}
    with os.scandir(root_str) as it:
        top_entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    top_images = [e.path for e in top_entries if e.is_file() and _is_image(e.name, exts)]
    top_dirs = [e for e in top_entries if e.is_dir()]

    show = is_rank0() if progress is None else progress
    visited: set[str] = {os.path.realpath(root_str)}
    per_dir: list[tuple[str, list[str]]] = []
    dirs_iter: Iterable[Any] = top_dirs
    if show and len(top_dirs) > 1:
        from tqdm import tqdm
        dirs_iter = tqdm(top_dirs, desc=f"listing {root_str}", unit="folder", leave=False)
    for d in dirs_iter:
        per_dir.append((d.name, _scan_tree(d.path, exts, dirs_seen, visited)))

    files: list[str] = []
    labels: list[int] = []
    classes: list[str] = []
    if not top_images and any(found for _, found in per_dir):
        empty = [name for name, found in per_dir if not found]
        if empty:
            logger.warning("image folder %s: class folder(s) without images kept as classes: %s",
                           root_str, ", ".join(empty))
        for name, found in per_dir:  # top_dirs are sorted by name, so class indices are too
            label = len(classes)
            classes.append(name)
            rel = sorted(os.path.relpath(p, root_str) for p in found)
            files.extend(rel)
            labels.extend([label] * len(rel))
    else:
        all_found = top_images + [p for _, found in per_dir for p in found]
        files = sorted(os.path.relpath(p, root_str) for p in all_found)
        labels = [-1] * len(files)

    if not files:
        raise FileNotFoundError(
            f"image folder {root_str} holds no images (searched recursively for files ending in "
            f"{', '.join(exts)}, case-insensitive)")
    rel_mtimes = {os.path.relpath(d, root_str): m for d, m in dirs_seen.items()}
    return Listing(files=files, labels=labels, classes=classes, dir_mtimes=rel_mtimes)


def _listing_cache_file(cache_dir: str | os.PathLike, root: str, exts: tuple[str, ...]) -> Path:
    key = hashlib.sha1(f"{root}\n{','.join(exts)}".encode()).hexdigest()[:16]
    return Path(cache_dir) / f"listing-{Path(root).name}-{key}.json"


# Folder mtimes tick with the kernel's coarse clock (milliseconds), so an entry added within the
# same tick as the scan may leave the mtime unchanged. Folders changed less than this long before
# the scan began are "racy" (as git calls such index entries): their entries are listed again.
_RACY_NS = 2_000_000_000


def _racy_dirs_unchanged(root: str, racy: set[str], files: list[str], dir_mtimes: dict[str, int],
                         exts: tuple[str, ...]) -> bool:
    """Re-list only the racy folders and compare with what the cached listing holds for them."""
    expected: dict[str, set[str]] = {d: set() for d in racy}
    for rel in files:
        parent, name = os.path.split(rel)
        if (parent or ".") in expected:
            expected[parent or "."].add(name)
    for rel in dir_mtimes:
        parent, name = os.path.split(rel)
        if rel != "." and (parent or ".") in expected:
            expected[parent or "."].add(name)
    for rel in racy:
        try:
            with os.scandir(os.path.join(root, rel)) as it:
                found = {e.name for e in it if not e.name.startswith(".")
                         and (e.is_dir() or (e.is_file() and _is_image(e.name, exts)))}
        except OSError:
            return False
        if found != expected[rel]:
            return False
    return True


def _cache_still_valid(root: str, dir_mtimes: dict[str, int], scanned_at_ns: int = 0,
                       files: list[str] | None = None, exts: tuple[str, ...] = IMAGE_EXTENSIONS) -> bool:
    """A folder's mtime changes when an entry is added, removed or renamed in it (racy folders,
    changed just before the scan, are listed again)."""
    for rel, mtime in dir_mtimes.items():
        try:
            if os.stat(os.path.join(root, rel)).st_mtime_ns != mtime:
                return False
        except OSError:
            return False
    racy = {rel for rel, mtime in dir_mtimes.items() if mtime >= scanned_at_ns - _RACY_NS}
    return not racy or _racy_dirs_unchanged(root, racy, files or [], dir_mtimes, exts)


def load_listing(root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 cache_dir: str | os.PathLike | None = None, progress: bool | None = None) -> Listing:
    """:func:`scan_images`, optionally through a JSON cache in ``cache_dir``.

    The cache is reused only while every scanned folder keeps its mtime, so adding or removing
    an image anywhere invalidates it; validating costs one ``stat`` per folder (about 1,000 for
    ImageNet) instead of 1.28M directory entries. Reading or building it happens under a file
    lock, so ranks started together list the folder once (the first) and the others reuse it.
    """
    root_str = os.path.abspath(os.fspath(root))
    exts = _normalise_extensions(extensions)
    if cache_dir is None:
        return scan_images(root_str, exts, progress)
    cache_file = _listing_cache_file(cache_dir, root_str, exts)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(cache_file.with_suffix(".lock")))
        except OSError as err:  # a read-only cache location: list without it
            logger.warning("listing cache %s not usable: %s", cache_file, err)
            return scan_images(root_str, exts, progress)
        # under the lock: the first rank lists, the others wait and read its result
        return _cached_or_scanned(cache_file, root_str, exts, progress)


def _cached_or_scanned(cache_file: Path, root_str: str, exts: tuple[str, ...], progress: bool | None) -> Listing:
    if cache_file.exists():
        try:
            data = json.loads(cache_file.read_text())
            if (data.get("version") == _LISTING_CACHE_VERSION and data.get("root") == root_str
                    and _cache_still_valid(root_str, data["dir_mtimes"], data.get("scanned_at_ns", 0),
                                          data["files"], exts)):
                return Listing(files=data["files"], labels=data["labels"], classes=data["classes"],
                               dir_mtimes=data["dir_mtimes"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("ignoring unreadable listing cache %s: %s", cache_file, err)
    scanned_at_ns = time.time_ns()
    listing = scan_images(root_str, exts, progress)
    payload = {"version": _LISTING_CACHE_VERSION, "root": root_str, "scanned_at_ns": scanned_at_ns,
               "files": listing.files,
               "labels": listing.labels, "classes": listing.classes, "dir_mtimes": listing.dir_mtimes}
    try:
        atomic_write_json(cache_file, payload)
    except OSError as err:  # a read-only cache location must not stop training
        logger.warning("could not write listing cache %s: %s", cache_file, err)
    return listing


class ImageFiles(Dataset):
    """Images below ``root`` (class or flat layout, see module doc) -> ``(sample, label, index)``.

    ``sample`` is ``transform(rgb_pil_image)`` (the PIL image itself without a transform). An
    index may be ``int`` or ``(index, sample_seed)``, the items of
    :class:`~ssl_xcit.data.sampler.ResumableDistributedSampler`; with a seed the transform's random
    draws depend on the seed only (exact resume, same crops with any number of workers).
    Returns ``None`` for an unreadable image; pair with :func:`collate_skip_corrupt`.
    ``draft_side``: see :func:`~ssl_xcit.data.common.load_rgb` (set by a caller that resizes every
    image's shorter side to it; ``None``, the default, decodes in full).
    """

    draft_side: int | None = None

    def __init__(self, root: str | os.PathLike, transform: Callable[[Image.Image], Any] | None = None, *,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, listing_cache_dir: str | os.PathLike | None = None,
                 progress: bool | None = None) -> None:
        self.root = Path(os.path.abspath(os.fspath(root)))
        self.transform = transform
        self.extensions = _normalise_extensions(extensions)
        listing = load_listing(self.root, self.extensions, listing_cache_dir, progress)
        # NumPy arrays, not lists of Python objects: DataLoader workers forked from this process
        # would otherwise copy every page of a 1.28M-entry list as reference counts change.
        self._files = np.array([os.fsencode(f) for f in listing.files], dtype=np.bytes_)
        self._targets = np.asarray(listing.labels, dtype=np.int64)
        self.classes: list[str] = listing.classes
        self.class_to_idx: dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        self._warned: set[str] = set()

    @property
    def is_flat(self) -> bool:
        return not self.classes

    @property
    def files(self) -> list[str]:
        """Paths relative to ``root``, in index order (built on each call)."""
        return [os.fsdecode(f) for f in self._files]

    @property
    def targets(self) -> list[int]:
        """Labels in index order (``-1`` everywhere for a flat folder; built on each call)."""
        return self._targets.tolist()

    @property
    def samples(self) -> list[tuple[str, int]]:
        """``(absolute path, label)`` pairs, torchvision's ImageFolder convention (built on each call)."""
        return [(str(self.root / f), t) for f, t in zip(self.files, self.targets)]

    def path(self, index: int) -> Path:
        return self.root / os.fsdecode(self._files[index])

    def label(self, index: int) -> int:
        return int(self._targets[index])

    def location(self, index: int) -> str:
        """Where image ``index`` is stored, for messages (its path)."""
        return str(self.path(index))

    def load(self, index: int) -> Image.Image:
        """Image ``index`` decoded as RGB; raises what decoding raises (``__getitem__`` skips instead)."""
        return load_rgb(str(self.path(index)))

    def image_size(self, index: int) -> tuple[int, int]:
        """``(width, height)`` of image ``index`` read from its header, without decoding it."""
        return read_size(str(self.path(index)))

    def __len__(self) -> int:
        return len(self._files)

    def select(self, indices: Sequence[int] | np.ndarray) -> "ImageFiles":
        """Keep only ``indices`` (in that order), in place; for quick runs on part of a folder."""
        idx = selection(indices, len(self._files))
        self._files = self._files[idx]
        self._targets = self._targets[idx]
        return self

    def __getitem__(self, item: Any) -> tuple[Any, int, int] | None:
        index, seed = parse_index(item, len(self._files))
        path = str(self.path(index))
        try:
            image = load_rgb(path, self.draft_side)
        except DECODE_ERRORS as err:
            if path not in self._warned:
                self._warned.add(path)
                logger.warning("skipping unreadable image %s: %s: %s", path, type(err).__name__, err)
            return None
        if self.transform is None:
            sample: Any = image
        elif seed is None:
            sample = self.transform(image)
        else:
            sample = run_seeded(self.transform, image, seed)
        return sample, self.label(index), index

    def __repr__(self) -> str:
        layout = "flat" if self.is_flat else f"{len(self.classes)} classes"
        return f"ImageFiles(root={str(self.root)!r}, {len(self)} images, {layout})"


@dataclass
class Batch:
    """A collated batch. Exactly one of ``crops`` (multi-crop: one stacked tensor per crop position)
    and ``images`` is set, except in an empty batch (every item corrupt) where both are ``None``.
    With ``data.augment=gpu`` (:mod:`ssl_xcit.data.gpu_multicrop`) ``images`` holds the decoded uint8
    images (stacked, or a list when their sizes differ) and ``params`` their drawn crop parameters."""

    labels: torch.Tensor          # int64 (B,)
    indices: torch.Tensor         # int64 (B,), dataset indices of the kept items
    n_skipped: int                # corrupt items dropped from this batch
    images: torch.Tensor | list[torch.Tensor] | None = None
    crops: list[torch.Tensor] | None = None
    params: torch.Tensor | None = None   # float64 (B, n_crops, N_PARAMS), gpu augmentation only

    def __len__(self) -> int:
        return int(self.indices.numel())

    @property
    def is_empty(self) -> bool:
        return len(self) == 0

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Batch":
        images = self.images
        if images is not None:
            images = fn(images) if isinstance(images, torch.Tensor) else [fn(t) for t in images]
        return Batch(labels=fn(self.labels), indices=fn(self.indices), n_skipped=self.n_skipped, images=images,
                     crops=None if self.crops is None else [fn(c) for c in self.crops],
                     params=None if self.params is None else fn(self.params))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Called by ``DataLoader(pin_memory=True)``."""
        return self._map(lambda t: t.pin_memory())


def collate_skip_corrupt(batch: Sequence[tuple[Any, int, int] | None]) -> Batch:
    """Drop ``None`` (corrupt) items and stack the rest into a :class:`Batch`."""
    kept = [b for b in batch if b is not None]
    n_skipped = len(batch) - len(kept)
    labels = torch.tensor([b[1] for b in kept], dtype=torch.long)
    indices = torch.tensor([b[2] for b in kept], dtype=torch.long)
    if not kept:
        return Batch(labels=labels, indices=indices, n_skipped=n_skipped)
    first = kept[0][0]
    if hasattr(first, "params") and hasattr(first, "image"):   # gpu_multicrop.ImageWithParams
        images = [b[0].image for b in kept]
        same = len({tuple(t.shape) for t in images}) == 1
        return Batch(labels=labels, indices=indices, n_skipped=n_skipped,
                     images=torch.stack(images) if same else images,
                     params=torch.stack([b[0].params for b in kept]))
    if isinstance(first, torch.Tensor):
        return Batch(labels=labels, indices=indices, n_skipped=n_skipped,
                     images=torch.stack([b[0] for b in kept]))
    if isinstance(first, (list, tuple)) and all(isinstance(c, torch.Tensor) for c in first):
        n_crops = len(first)
        for b in kept:
            if not isinstance(b[0], (list, tuple)) or len(b[0]) != n_crops:
                got = f"{len(b[0])} crops" if isinstance(b[0], (list, tuple)) else type(b[0]).__name__
                raise ValueError(f"every sample must have {n_crops} crops like the first one; dataset "
                                 f"index {b[2]} has {got}")
        crops = []
        for pos in range(n_crops):
            shapes = {tuple(b[0][pos].shape) for b in kept}
            if len(shapes) != 1:
                raise ValueError(f"crop position {pos} has differing shapes {sorted(shapes)} within one "
                                 "batch; a multi-crop transform must give each position a fixed size")
            crops.append(torch.stack([b[0][pos] for b in kept]))
        return Batch(labels=labels, indices=indices, n_skipped=n_skipped, crops=crops)
    raise TypeError(f"collate_skip_corrupt needs the transform to return a Tensor or a list of Tensors, "
                    f"got {type(first).__name__}; give ImageFiles a transform ending in ToTensor()")

"""WebDataset-style tar shards read in place, by sample index: ImageNet as clusters store it.

A *shard source* is one of

* a folder of ``*.tar`` shards (made by :mod:`ssl_xcit.data.make_shards`, or any WebDataset shards);
* a brace pattern such as ``/data/in1k/train-{000000..000146}.tar``;
* a list of shard paths (or a comma-separated string of them).

A shard holds samples as consecutive members sharing a key: ``KEY.jpg`` (or ``.jpeg``/``.png``/
``.webp``/... any of :data:`~ssl_xcit.data.folders.IMAGE_EXTENSIONS`), optionally ``KEY.cls``
(an integer label) or ``KEY.json`` (``{"label": int}`` or ``{"cls": int}``). The key is the member
name up to the first dot of its last path component, as in WebDataset.

Reading: :class:`ShardImages` keeps, per sample, the shard, the byte offset and the size of its
image member, and reads it with one ``os.pread`` -- random access by index, so the project's
index-based :class:`~ssl_xcit.data.sampler.ResumableDistributedSampler` works on shards exactly as
on folders (exact mid-epoch resume, resume on another number of GPUs), and index ``i`` of shards
made from a folder is index ``i`` of that folder.

Why not ``wids`` (webdataset's indexed reader): it re-indexes a whole shard (every tar header)
each time its small LRU of open shards misses, which is nearly every sample under a global
shuffle over hundreds of shards (benchmarks/data_sources.py measures it); it stores indexes as
pickles (loading a shared pickle runs code); it prints to stderr on every construction; and its
mmap index ignores ustar name prefixes. The format stays WebDataset's, so shards made here read
in ``webdataset``/``wids`` too, and foreign WebDataset shards read here.

Index: shards made by ``make_shards`` carry ``manifest.json`` and one ``<shard>.idx.npy`` per
shard (plain int64 arrays, loaded with ``allow_pickle=False``): opening 1.28M samples reads
~150 small files, no tar header. Foreign shards are scanned once with ``tarfile`` (which knows
pax/GNU long names) and the index cached (``$SSL_XCIT_HOME/data/shard-index``) under a file lock:
the first rank scans, the others wait and load the result.

Faults: a shard shorter than its manifest says, or one that ends without tar's end-of-archive
blocks, is a :class:`ShardError` naming it; an undecodable member returns ``None`` (skipped and
counted by :func:`~ssl_xcit.data.folders.collate_skip_corrupt`), as a corrupt file does.
"""
from __future__ import annotations

import collections
import glob
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ssl_xcit.atomic import atomic_write
from ssl_xcit.ranks import is_rank0
from ssl_xcit.data.common import (DECODE_ERRORS, IMAGE_EXTENSIONS, load_rgb, parse_index, read_size,
                                  run_seeded, selection)
from ssl_xcit.errors import UserError
from ssl_xcit.locks import file_lock

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
INDEX_SUFFIX = ".idx.npy"
FORMAT = "ssl_xcit-shards"
FORMAT_VERSION = 1
# index columns: position in the source listing, image offset in the shard, image size, label
SOURCE, OFFSET, SIZE, LABEL = range(4)
_MAX_OPEN_SHARDS = 64


class ShardError(UserError, ValueError):
    """A shard source that cannot be read as it is (missing, truncated, no images)."""


# ------------------------------------------------------------------------------- naming shards
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> three names; ``{x,y}`` lists work too (bash/WebDataset style)."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [name for item in items for name in expand_braces(head + item + tail)]


def looks_like_shards(path: str | os.PathLike | Sequence[str]) -> bool:
    """True for a brace pattern, a list of ``.tar`` files, or a folder holding ``.tar`` shards
    (a ``manifest.json`` of this format, or ``*.tar`` files and neither images nor sub-folders)."""
    if isinstance(path, (list, tuple)):
        return True
    text = os.fspath(path)
    if "{" in text and "}" in text and not os.path.exists(text):
        return True
    if "," in text and not os.path.exists(text):
        return all(p.strip().endswith(".tar") for p in text.split(","))
    p = Path(text)
    if not p.is_dir():
        return False
    manifest = p / MANIFEST
    if manifest.is_file():
        try:
            return json.loads(manifest.read_text()).get("format") == FORMAT
        except (OSError, ValueError):
            return False
    with os.scandir(p) as it:
        entries = [e for e in it if not e.name.startswith(".")]
    images = any(e.name.lower().endswith(IMAGE_EXTENSIONS) for e in entries)
    return (any(e.name.endswith(".tar") and e.is_file() for e in entries) and not images
            and not any(e.is_dir() for e in entries))


def shard_paths(source: str | os.PathLike | Sequence[str]) -> list[Path]:
    """The shard files of a source, in order (sorted by name for a folder)."""
    if isinstance(source, (list, tuple)):
        names = [os.fspath(s) for s in source]
    else:
        text = os.fspath(source)
        if os.path.isdir(text):
            names = sorted(glob.glob(os.path.join(glob.escape(text), "*.tar")))
        elif "," in text and not os.path.exists(text):
            names = [n.strip() for n in text.split(",") if n.strip()]
        else:
            names = expand_braces(text)
    paths = [Path(n).expanduser().absolute() for n in names]
    if not paths:
        raise ShardError(f"shard source {source} holds no .tar shards")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ShardError(f"shard source {source}: {len(missing)} shard(s) missing, first {missing[0]}")
    return paths


# ------------------------------------------------------------------------------- scanning a shard
def _split_key(name: str) -> tuple[str, str]:
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:].lower())


def _label_from(ext: str, data: bytes) -> int | None:
    try:
        if ext == "cls":
            return int(data.decode().strip())
        if ext == "json":
            meta = json.loads(data)
            for field in ("label", "cls"):
                if isinstance(meta, dict) and isinstance(meta.get(field), int):
                    return int(meta[field])
    except (ValueError, UnicodeDecodeError):
        return None
    return None


def check_tar_end(fileobj: Any, end_offset: int, shard: Path) -> None:
    """Raise :class:`ShardError` unless two zero blocks follow the last member at ``end_offset``."""
    fileobj.seek(end_offset)
    tail = fileobj.read(2 * tarfile.BLOCKSIZE)
    if len(tail) < 2 * tarfile.BLOCKSIZE or tail.count(0) != len(tail):
        raise ShardError(f"shard {shard} is truncated: it ends without tar's end-of-archive blocks; "
                         "copy or re-make it")


def scan_shard(path: Path) -> tuple[np.ndarray, list[str]]:
    """Index of one WebDataset shard by reading its tar headers: ``(rows, keys)``, rows as in
    ``<shard>.idx.npy`` (source column = sample number in the shard, label -1 when none)."""
    image_exts = {e.lstrip(".") for e in IMAGE_EXTENSIONS}
    rows: list[list[int]] = []
    keys: list[str] = []
    current: dict[str, Any] = {}

    def flush() -> None:
        if current.get("image") is not None:
            offset, size = current["image"]
            label = current.get("label")
            rows.append([len(rows), offset, size, -1 if label is None else label])
            keys.append(current["key"])

    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                if key != current.get("key"):
                    flush()
                    current = {"key": key}
                if ext in image_exts and current.get("image") is None:
                    current["image"] = (member.offset_data, member.size)
                elif ext in ("cls", "json") and current.get("label") is None and member.size < 1 << 16:
                    current["label"] = _label_from(ext, tar.extractfile(member).read())
            flush()
            check_tar_end(tar.fileobj, tar.offset, path)
    except (tarfile.ReadError, EOFError) as err:
        raise ShardError(f"shard {path} is not a readable tar file (truncated or corrupt?): {err}") from err
    return np.asarray(rows, dtype=np.int64).reshape(-1, 4), keys


# ------------------------------------------------------------------------------- the index
@dataclass
class ShardIndex:
    """Where every sample of a shard source lies; what :class:`ShardImages` needs to read it."""

    shards: list[Path]
    shard_bytes: list[int | None]   # expected size of each shard (None: not recorded)
    shard_of: np.ndarray            # int32, per sample
    rows: np.ndarray                # int64 (n, 4): source position, offset, size, label
    classes: list[str]


def load_index_file(idx_file: Path, samples: int) -> np.ndarray:
    """A shard's ``<shard>.idx.npy`` as its (samples, 4) int64 rows; a missing, damaged or foreign file is
    a :class:`ShardError` naming the shard (numpy's own error is a page of traceback naming neither)."""
    shard = idx_file.with_name(idx_file.name[:-len(INDEX_SUFFIX)])
    try:
        rows = np.load(idx_file, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:150]
        raise ShardError(f"shard {shard}: its index {idx_file.name} is unreadable ({type(err).__name__}: "
                         f"{reason})") from None
    if rows.ndim != 2 or rows.shape != (samples, 4) or rows.dtype.kind not in "iu":
        raise ShardError(f"shard {shard}: its index {idx_file.name} holds a {rows.dtype} array of shape "
                         f"{rows.shape}, the manifest says {samples} rows of 4 integers")
    return rows


def _from_manifest(folder: Path) -> ShardIndex:
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("version") != FORMAT_VERSION:
        raise ShardError(f"{folder / MANIFEST} has format version {manifest.get('version')}, this ssl_xcit "
                         f"reads version {FORMAT_VERSION}")
    shards, sizes, parts, owner = [], [], [], []
    for k, entry in enumerate(manifest["shards"]):
        shard = folder / entry["name"]
        idx_file = folder / (entry["name"] + INDEX_SUFFIX)
        if not shard.is_file():
            raise ShardError(f"shard {shard} listed in {folder / MANIFEST} is missing")
        try:
            rows = load_index_file(idx_file, entry["samples"])
        except ShardError as err:  # make_shards rewrites a split from its first damaged shard on
            source = manifest.get("source") or "SRC"
            raise ShardError(f"{err}; rebuild it with: python -m ssl_xcit.data.make_shards {source} {folder} "
                             "(the same command that made it, with the same options; it rewrites the shards "
                             "from the first damaged one)") from None
        shards.append(shard)
        sizes.append(int(entry["bytes"]))
        parts.append(rows)
        owner.append(np.full(len(rows), k, dtype=np.int32))
    return ShardIndex(shards, sizes, np.concatenate(owner), np.concatenate(parts).astype(np.int64),
                      list(manifest.get("classes", [])))


def _scan_cache_file(paths: list[Path], cache_dir: Path) -> Path:
    ident = "\n".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths)
    return cache_dir / f"shards-{hashlib.sha1(ident.encode()).hexdigest()[:20]}.npz"


def _scan_all(paths: list[Path], cache_dir: Path | None, progress: bool) -> ShardIndex:
    """Index foreign shards by scanning them, once: cached under a lock the other ranks wait on."""
    def build() -> dict[str, np.ndarray]:
        parts, owner = [], []
        items: Any = enumerate(paths)
        if progress and len(paths) > 1:
            from tqdm import tqdm
            items = tqdm(items, total=len(paths), desc="indexing shards", unit="shard", leave=False)
        for k, p in items:
            rows, _ = scan_shard(p)
            parts.append(rows)
            owner.append(np.full(len(rows), k, dtype=np.int32))
        return {"rows": np.concatenate(parts), "shard_of": np.concatenate(owner),
                "sizes": np.asarray([p.stat().st_size for p in paths], dtype=np.int64)}

    if cache_dir is None:
        data = build()
    else:
        cache_file = _scan_cache_file(paths, cache_dir)
        with file_lock(cache_file.with_suffix(".lock")):
            if cache_file.exists():
                with np.load(cache_file, allow_pickle=False) as z:
                    data = {k: z[k] for k in z.files}
            else:
                data = build()
                try:
                    atomic_write(cache_file, lambda tmp: np.savez(open(tmp, "wb"), **data))
                except OSError as err:
                    logger.warning("could not write shard index cache %s: %s", cache_file, err)
    rows = data["rows"]
    labelled = rows[:, LABEL] >= 0
    classes = [str(i) for i in range(int(rows[:, LABEL].max()) + 1)] if labelled.all() and len(rows) else []
    if not labelled.all():
        rows = rows.copy()
        rows[:, LABEL] = -1
    return ShardIndex(paths, [int(s) for s in data["sizes"]], data["shard_of"], rows, classes)


def load_shard_index(source: str | os.PathLike | Sequence[str], cache_dir: str | os.PathLike | None = None,
                     progress: bool | None = None) -> ShardIndex:
    """The index of a shard source: from ``manifest.json`` when there is one, else by scanning."""
    if not isinstance(source, (list, tuple)) and (Path(os.fspath(source)) / MANIFEST).is_file():
        index = _from_manifest(Path(os.fspath(source)).absolute())
    else:
        show = is_rank0() if progress is None else progress
        index = _scan_all(shard_paths(source), None if cache_dir is None else Path(cache_dir), show)
    for shard, expected in zip(index.shards, index.shard_bytes):
        actual = shard.stat().st_size
        if expected is not None and actual != expected:
            raise ShardError(f"shard {shard} is truncated or changed: {actual} bytes, its index says {expected}; "
                             "copy or re-make it")
    if not len(index.rows):
        raise ShardError(f"shard source {source} holds no images")
    return index


# ------------------------------------------------------------------------------- the dataset
class ShardImages(Dataset):
    """Images in tar shards -> ``(sample, label, index)``, the interface of
    :class:`~ssl_xcit.data.folders.ImageFiles` (``__len__``, ``__getitem__`` with ``int`` or
    ``(index, sample_seed)``, ``select``, ``targets``, ``classes``, ``label``, ``load``,
    ``location``, ``root``, ``draft_side``, ``None`` for a corrupt image)."""

    draft_side: int | None = None   # as ImageFiles.draft_side: see ssl_xcit.data.common.load_rgb

    def __init__(self, source: str | os.PathLike | Sequence[str],
                 transform: Callable[[Image.Image], Any] | None = None, *,
                 index_cache_dir: str | os.PathLike | None = None, progress: bool | None = None) -> None:
        self.source = source if isinstance(source, (list, tuple)) else os.fspath(source)
        # what messages name as "where the images are" (ImageFiles.root's role)
        self.root = Path(os.path.abspath(self.source)) if isinstance(self.source, str) else Path(self.source[0]).parent
        self.transform = transform
        index = load_shard_index(source, index_cache_dir, progress)
        self._shards = [os.fspath(p) for p in index.shards]
        self._shard_of = index.shard_of
        self._rows = index.rows
        self.classes: list[str] = index.classes
        self.class_to_idx: dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        self._fds: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._warned: set[int] = set()

    # the open file descriptors stay with the process that opened them
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fds"] = collections.OrderedDict()
        return state

    @property
    def is_flat(self) -> bool:
        return not self.classes

    @property
    def targets(self) -> list[int]:
        return self._rows[:, LABEL].tolist()

    @property
    def shards(self) -> list[str]:
        return list(self._shards)

    @property
    def files(self) -> list[str]:
        """Each image's member name in its shard (``KEY.jpg``; for shards made from a folder, the
        image's path relative to that folder), in index order; reads one tar header per image."""
        return [self.member_name(i) for i in range(len(self._rows))]

    def member_name(self, index: int) -> str:
        """The name of image ``index``'s tar member, from the header block before its data."""
        shard = int(self._shard_of[index])
        header = os.pread(self._fd(shard), tarfile.BLOCKSIZE, int(self._rows[index, OFFSET]) - tarfile.BLOCKSIZE)
        try:
            return tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape").name
        except tarfile.HeaderError:
            return self.location(index)

    def label(self, index: int) -> int:
        return int(self._rows[index, LABEL])

    def location(self, index: int) -> str:
        """Where image ``index`` is stored, for messages: ``shard.tar@byte_offset``."""
        return f"{self._shards[int(self._shard_of[index])]}@{int(self._rows[index, OFFSET])}"

    def load(self, index: int) -> Image.Image:
        """Image ``index`` decoded as RGB; raises what decoding raises (``__getitem__`` skips instead)."""
        return load_rgb(io.BytesIO(self.read_bytes(index)))

    def image_size(self, index: int) -> tuple[int, int]:
        """``(width, height)`` of image ``index`` read from its header, without decoding it."""
        return read_size(io.BytesIO(self.read_bytes(index)))

    def __len__(self) -> int:
        return len(self._rows)

    def select(self, indices: Sequence[int] | np.ndarray) -> "ShardImages":
        """Keep only ``indices`` (in that order), in place, like ``ImageFiles.select``."""
        idx = selection(indices, len(self._rows))
        self._rows = self._rows[idx]
        self._shard_of = self._shard_of[idx]
        return self

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            fd = os.open(self._shards[shard], os.O_RDONLY)
            self._fds[shard] = fd
            if len(self._fds) > _MAX_OPEN_SHARDS:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(shard)
        return fd

    def read_bytes(self, index: int) -> bytes:
        """The stored image file of sample ``index`` (its bytes as in the shard)."""
        shard = int(self._shard_of[index])
        offset, size = int(self._rows[index, OFFSET]), int(self._rows[index, SIZE])
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise ShardError(f"shard {self._shards[shard]} is truncated: sample {index} needs bytes "
                             f"{offset}-{offset + size}, the file ends first; copy or re-make it")
        return data

    def __getitem__(self, item: Any) -> tuple[Any, int, int] | None:
        index, seed = parse_index(item, len(self._rows))
        data = self.read_bytes(index)  # outside the try: a missing or truncated shard is an error
        try:
            image = load_rgb(io.BytesIO(data), self.draft_side)
        except DECODE_ERRORS as err:
            if index not in self._warned:
                self._warned.add(index)
                shard = self._shards[int(self._shard_of[index])]
                logger.warning("skipping unreadable image at byte %d of shard %s: %s: %s",
                               int(self._rows[index, OFFSET]), shard, type(err).__name__, err)
            return None
        if self.transform is None:
            sample: Any = image
        elif seed is None:
            sample = self.transform(image)
        else:
            sample = run_seeded(self.transform, image, seed)
        return sample, self.label(index), index

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self) -> str:
        layout = "flat" if self.is_flat else f"{len(self.classes)} classes"
        return f"ShardImages({len(self._shards)} shards, {len(self)} images, {layout})"

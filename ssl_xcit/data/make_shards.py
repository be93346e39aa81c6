"""Write WebDataset-style tar shards from an image folder, once, to read in place afterwards.

    python -m ssl_xcit.data.make_shards SRC DEST --shard-size 1GB [--resize 256 --quality 90]

``SRC`` is an ImageFolder (``<class>/<image>``), a flat folder, a root holding ``train/`` (and
``val/``) such folders, or an archive :func:`~ssl_xcit.data.sources.resolve_data_path` accepts.
A root with ``train/`` gives ``DEST/train`` and ``DEST/val``, so ``DEST`` can replace the folder
anywhere (training ``data_path``, evaluation ``--data-path``, quickstart ``--data``).

Each sample is ``KEY.<ext>`` (the original bytes, or a JPEG when resizing) and, with classes,
``KEY.cls`` (the label). KEY is the image's path relative to its split, without extension.
Samples keep the order of :func:`~ssl_xcit.data.folders.scan_images`, so index ``i`` of the
shards is index ``i`` of the folder. Beside ``shard-NNNNNN.tar``: ``shard-NNNNNN.tar.idx.npy``
(offset, size and label of every image, for random access), ``shard-NNNNNN.tar.json`` (its
count, bytes, SHA-256, source range, skipped files) and, when all are written, ``manifest.json``
(counts, classes, per-class counts, the shards with their hashes, the options).

Resumable: a shard counts as done once its ``.json`` is written (last, atomically); an
interrupted run starts again after the last done shard. One make_shards per DEST: it holds
``DEST/.make_shards.lock`` (:class:`~ssl_xcit.locks.OutputDirLock`), and a second one is refused
with the first one's host, pid and start time. Unreadable source images are skipped,
counted and listed in the manifest. ``--resize N`` scales the shorter side down to N px (never
up) and stores JPEG at ``--quality``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ssl_xcit.data.common import DECODE_ERRORS, load_rgb
from ssl_xcit.data.folders import scan_images
from ssl_xcit.data.shards import FORMAT, FORMAT_VERSION, INDEX_SUFFIX, MANIFEST, ShardError, load_index_file
from ssl_xcit.errors import UserError
from ssl_xcit.locks import OutputDirLock
from ssl_xcit.atomic import atomic_write, atomic_write_json

STATE = ".make_shards.json"
LOCK_NAME = ".make_shards.lock"   # in DEST, held by the make_shards writing there (ssl_xcit.locks.OutputDirLock)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class MakeShardsError(UserError, ValueError):
    """Bad options, or a destination holding shards made from something else. ``option``: the
    ``make_shards`` argument at fault, which the command line names as its flag."""

    def __init__(self, message: str, option: str = "") -> None:
        super().__init__(message)
        self.option = option


def parse_size(text: str) -> int:
    """``"1GB"`` -> 10**9, ``"512MiB"`` -> 2**29, ``"1000000"`` -> bytes."""
    import re
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise MakeShardsError(f"shard size {text!r}: expected a size such as 1GB, 500MB or 256MiB", "shard_size")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size < 10 * tarfile.BLOCKSIZE:
        raise MakeShardsError(f"shard size {text!r} is too small (at least 5KB)", "shard_size")
    return size


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.tar"


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes what passes through (the shard's SHA-256 without re-reading)."""

    def __init__(self, path: Path) -> None:
        self._fh = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self._pos = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.sha256.update(data)
        n = self._fh.write(data)
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
        super().close()


def _encode(path: Path, resize: int | None, quality: int) -> tuple[bytes, str]:
    """The bytes to store and their extension; raises a decode error for an unreadable image."""
    data = path.read_bytes()
    image = load_rgb(io.BytesIO(data))  # every stored image has been decoded once
    if resize is None:
        return data, path.suffix.lower().lstrip(".")
    w, h = image.size
    if min(w, h) > resize:
        scale = resize / min(w, h)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC,
                             reducing_gap=3.0)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue(), "jpg"


def _key(rel: str, previous: str) -> str:
    stem = os.path.splitext(rel)[0].replace(os.sep, "/").replace(".", "_")
    return stem if stem != previous else f"{stem}_dup"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append one member; return the offset of its data in the shard."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))
    return tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _size_after(offset: int, image_bytes: int, labelled: bool) -> int:
    """The shard's final size if it ended after one more sample: headers, data padded to blocks,
    the label member, tar's two end blocks, padding to a 10 KiB record (pax headers not counted)."""
    block, record = tarfile.BLOCKSIZE, tarfile.RECORDSIZE
    end = offset + block + -(-image_bytes // block) * block + (2 * block if labelled else 0) + 2 * block
    return -(-end // record) * record


def _claim(dest: Path, options: dict[str, Any]) -> None:
    """Record ``options`` in ``dest``, or check they are the ones an earlier, interrupted call recorded."""
    dest.mkdir(parents=True, exist_ok=True)
    state = dest / STATE
    if not state.exists():
        atomic_write_json(state, options)
        return
    before = json.loads(state.read_text())
    if before != options:
        changed = sorted(k for k in options if before.get(k) != options[k])
        raise MakeShardsError(f"{dest} holds shards made from other input or options (differs in "
                              f"{', '.join(changed)}); give another DEST or delete it")


def _intact(dest: Path, meta: dict[str, Any]) -> bool:
    """Whether a finished shard is still whole: its tar has the size recorded and its index reads."""
    shard = dest / meta["name"]
    try:
        load_index_file(dest / (meta["name"] + INDEX_SUFFIX), meta["samples"])
        return shard.is_file() and shard.stat().st_size == meta["bytes"]
    except ShardError:
        return False


def _finished_shards(dest: Path) -> list[dict[str, Any]]:
    """The records of the shards an earlier call finished (in order), up to the first damaged one (a
    truncated tar, an unreadable index), whose record and later ones are removed so that they are made
    again; a half-written shard is removed."""
    done: list[dict[str, Any]] = []
    while (dest / (shard_name(len(done)) + ".json")).exists():
        meta = json.loads((dest / (shard_name(len(done)) + ".json")).read_text())
        if not _intact(dest, meta):
            for record in dest.glob("shard-*.tar.json"):
                if int(record.name[len("shard-"):-len(".tar.json")]) >= len(done):
                    record.unlink()
            break
        done.append(meta)
    for stale in dest.glob(".shard-*.tmp"):
        stale.unlink()
    return done


def _write_shard(src: Path, dest: Path, k: int, listing, i: int, shard_size: int, resize: int | None,
                 quality: int, bar) -> tuple[dict[str, Any] | None, int, list[str]]:
    """Shard ``k`` from image ``i`` on, until it is full: (its record, or None when only unreadable images
    were left; the next image; the images skipped as unreadable). The tar, its index and then its record
    are written atomically, so a crash leaves whole shards only."""
    files, labels, classes = listing.files, listing.labels, listing.classes
    tmp = dest / f".{shard_name(k)}.tmp"
    out = _HashingFile(tmp)
    rows: list[list[int]] = []
    skipped: list[str] = []
    first, previous = i, ""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        while i < len(files):
            try:
                data, ext = _encode(src / files[i], resize, quality)
            except DECODE_ERRORS:
                skipped.append(files[i])
                i += 1
                if bar is not None:
                    bar.update(1)
                continue
            if rows and _size_after(tar.offset, len(data), bool(classes)) > shard_size:
                break  # the shard is full; this image opens the next one
            key = _key(files[i], previous)
            previous = key
            offset = _add(tar, f"{key}.{ext}", data)
            if classes:
                _add(tar, f"{key}.cls", str(labels[i]).encode())
            rows.append([i, offset, len(data), labels[i]])
            i += 1
            if bar is not None:
                bar.update(1)
    out.close()
    if not rows:
        tmp.unlink()
        return None, i, skipped
    final = dest / shard_name(k)
    os.replace(tmp, final)
    atomic_write(dest / (shard_name(k) + INDEX_SUFFIX),
                 lambda path: np.save(open(path, "wb"), np.asarray(rows, dtype=np.int64)))
    meta = {"name": shard_name(k), "samples": len(rows), "bytes": final.stat().st_size,
            "sha256": out.sha256.hexdigest(), "start": first, "end": i, "skipped": skipped}
    atomic_write_json(dest / (shard_name(k) + ".json"), meta)
    return meta, i, skipped


def _write_manifest(src: Path, dest: Path, n_files: int, classes: list[str], done: list[dict[str, Any]],
                    options: dict[str, Any]) -> dict[str, Any]:
    """The split's manifest.json, from the shards' records and indexes; written last, so its presence
    means the split is complete."""
    kept = np.concatenate([np.load(dest / (m["name"] + INDEX_SUFFIX)) for m in done]) if done else np.zeros((0, 4))
    if not len(kept):
        raise MakeShardsError(f"{src}: none of the {n_files} images could be read; no shard written")
    skipped_files = [f for m in done for f in m["skipped"]]
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "source": str(src), "images": int(len(kept)),
                "skipped": len(skipped_files), "skipped_files": skipped_files, "classes": classes,
                "class_counts": np.bincount(kept[:, 3].astype(np.int64), minlength=len(classes)).tolist()
                if classes else [],
                "shards": [{k: m[k] for k in ("name", "samples", "bytes", "sha256")} for m in done],
                "options": {k: options[k] for k in ("shard_size", "resize", "quality")}}
    atomic_write_json(dest / MANIFEST, manifest, indent=1)
    return manifest


def write_split(src: Path, dest: Path, shard_size: int, resize: int | None = None, quality: int = 90,
                progress: bool = True) -> dict[str, Any]:
    """Shard one image folder into ``dest``; returns the manifest (also written as manifest.json).
    An interrupted call, run again with the same input and options, goes on after its last whole shard."""
    listing = scan_images(src, progress=progress)
    files = listing.files
    options = {"source": str(src), "images": len(files), "classes": listing.classes, "shard_size": shard_size,
               "resize": resize, "quality": quality if resize else None,
               "listing_sha1": hashlib.sha1("\n".join(files).encode()).hexdigest()}
    _claim(dest, options)
    done = _finished_shards(dest)
    if (dest / MANIFEST).exists():
        manifest = json.loads((dest / MANIFEST).read_text())
        if len(done) == len(manifest["shards"]):
            return manifest
        (dest / MANIFEST).unlink()   # a damaged shard: made again from there, then a new manifest
    i = done[-1]["end"] if done else 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(files), initial=i, desc=f"sharding {src}", unit="img")
    while i < len(files):
        meta, i, skipped = _write_shard(src, dest, len(done), listing, i, shard_size, resize, quality, bar)
        if meta is None:  # only unreadable images were left: the last shard's record takes them
            if done:
                done[-1]["skipped"] += skipped
                done[-1]["end"] = i
            break
        done.append(meta)
    if bar is not None:
        bar.close()
    return _write_manifest(src, dest, len(files), listing.classes, done, options)


def splits_of(root: Path) -> list[str]:
    """``["train", "val"]`` (those present) for a root holding train/, else ``[""]`` (root itself)."""
    if (root / "train").is_dir():
        return [s for s in ("train", "val") if (root / s).is_dir()]
    return [""]


def make_shards(src: str | os.PathLike, dest: str | os.PathLike, shard_size: int | str = "1GB",
                resize: int | None = None, quality: int = 90, progress: bool = True) -> dict[str, dict]:
    """Shard ``src`` into ``dest`` (see the module doc); returns ``{split: manifest}``."""
    from ssl_xcit.data.sources import resolve_data_path
    size = parse_size(shard_size) if isinstance(shard_size, str) else int(shard_size)
    if resize is not None and resize < 1:
        raise MakeShardsError(f"resize must be a positive number of pixels, got {resize}", "resize")
    if not 1 <= quality <= 100:
        raise MakeShardsError(f"quality must be within 1..100, got {quality}", "quality")
    root = resolve_data_path(src, progress=progress)
    dest = Path(dest).expanduser().absolute()
    if dest == root or root in dest.parents:
        raise MakeShardsError(f"DEST {dest} lies inside SRC {root}; write the shards elsewhere")
    dest.mkdir(parents=True, exist_ok=True)
    # one writer per DEST: two at once removed each other's temp files or both did the whole job
    with OutputDirLock(dest, LOCK_NAME, "make_shards", "give another DEST"):
        return {split or ".": write_split(root / split if split else root, dest / split if split else dest, size,
                                          resize, quality, progress) for split in splits_of(root)}


if __name__ == "__main__":   # the command line is the command layer's (its parser, its flags)
    from ssl_xcit.commands.make_shards import run_as_script
    run_as_script()

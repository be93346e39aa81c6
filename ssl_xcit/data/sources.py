"""Where images come from: a folder as-is, a tar archive unpacked once into a cache, or CIFAR-10.

Archives are unpacked into ``<cache>/<name>-<size>-<mtime_ns>/`` so a changed archive gets a fresh
folder. Unpacking goes to a temporary folder under a file lock and is renamed into place with a
completeness marker inside, so concurrent ranks unpack once and nobody sees half a dataset.
Members are filtered with ``tarfile``'s ``'data'`` filter (no absolute paths, no ``..``, no devices).
An archive is cached only once its end has been read and checked: tar's two zero end-of-archive
blocks after the last member, and for ``.tar.gz`` the gzip trailer (CRC and length). A copy cut
short at a member boundary otherwise unpacks "successfully" with whole folders (val/) missing.
The lock file is removed when the unpacking ends, whether it succeeded or not.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Iterator

from ssl_xcit.atomic import atomic_write_json
from ssl_xcit.ranks import is_rank0
from ssl_xcit.errors import UserError
from ssl_xcit.locks import file_lock

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MARKER = ".ssl_xcit_complete"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class ArchiveError(UserError, ValueError):
    """An archive that cannot be used as it is: unreadable, truncated, unsafe or without train/."""


def default_cache_dir() -> Path:
    """``$SSL_XCIT_HOME/data`` if set, else ``~/.cache/ssl_xcit/data``."""
    home = os.environ.get("SSL_XCIT_HOME")
    if home:
        return Path(home).expanduser() / "data"
    return Path.home() / ".cache" / "ssl_xcit" / "data"


def _archive_stem(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def _find_root(folder: Path, archive: Path) -> Path:
    """The folder holding ``train/``: the top, or the archive's single top-level folder."""
    if (folder / "train").is_dir():
        return folder
    top = [p for p in folder.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX"]
    if len(top) == 1 and top[0].is_dir() and (top[0] / "train").is_dir():
        return top[0]
    listing = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in top)[:10]) or "nothing"
    raise ArchiveError(f"archive {archive} has no train/ folder at its top or inside a single top-level "
                     f"folder (its top level holds: {listing})")


def _check_archive_end(tar: tarfile.TarFile, archive: Path) -> None:
    """Raise unless the archive ends as a complete one does (call after reading every member).

    ``tarfile`` stops quietly when the data ends at a member boundary, so a truncated copy looks
    complete; a whole archive has two zero blocks after its last member. Reading on to the end
    of the stream also makes ``gzip`` check its trailer (CRC-32 and length).
    """
    fileobj = tar.fileobj
    fileobj.seek(tar.offset)
    end = fileobj.read(2 * tarfile.BLOCKSIZE)
    if len(end) < 2 * tarfile.BLOCKSIZE or end.count(0) != len(end):
        last = tar.members[-1].name if tar.members else "none"
        raise ArchiveError(f"archive {archive} is truncated: it ends without tar's end-of-archive blocks "
                           f"(last complete member: {last}); copy or download it again")
    while fileobj.read(1 << 20):  # the rest (padding): gzip verifies its trailer at the end
        pass


def _extract(archive: Path, dest: Path, progress: bool) -> None:
    if not hasattr(tarfile, "data_filter"):
        raise RuntimeError("safe tar extraction needs Python >= 3.10.12 / 3.11.4 (tarfile filter='data')")
    try:
        with tarfile.open(archive, "r:*") as tar:
            members: Iterator[tarfile.TarInfo] = iter(tar)
            if progress:
                from tqdm import tqdm
                members = tqdm(members, desc=f"unpacking {archive.name}", unit="file")
            tar.extractall(dest, members=members, filter="data")
            _check_archive_end(tar, archive)
    except tarfile.FilterError as err:
        raise ArchiveError(f"archive {archive} holds an unsafe member, refused: {err}") from err
    except (tarfile.ReadError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise ArchiveError(f"{archive} is not a readable tar archive (truncated or corrupt?): {err}") from err


def extract_archive(archive: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                    progress: bool | None = None) -> Path:
    """Unpack ``archive`` once into the cache and return the folder holding ``train/``."""
    archive = Path(archive).expanduser().resolve()
    stem = _archive_stem(archive)
    if stem is None:
        raise ArchiveError(f"{archive} is not a supported archive (expected {', '.join(ARCHIVE_SUFFIXES)})")
    st = archive.stat()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = f"{re.sub(r'[^A-Za-z0-9._-]', '_', stem)}-{st.st_size}-{st.st_mtime_ns}"
    target = cache / key
    marker = target / MARKER
    show = is_rank0() if progress is None else progress

    def cached_root() -> Path:
        info = json.loads(marker.read_text())
        return target / info["root"]

    if marker.exists():
        return cached_root()
    cache.mkdir(parents=True, exist_ok=True)
    with file_lock(cache / f".{key}.lock"):
        if marker.exists():  # another process finished while we waited
            return cached_root()
        if target.exists():
            raise RuntimeError(f"cache folder {target} exists without its completeness marker {MARKER}; "
                               "it was not made by ssl_xcit: delete it and retry")
        for stale in cache.glob(f".{key}.tmp-*"):  # left by a crashed unpack (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache))
        try:
            _extract(archive, tmp, show)
            root = _find_root(tmp, archive)
            atomic_write_json(tmp / MARKER, {"archive": str(archive), "size": st.st_size,
                                             "mtime_ns": st.st_mtime_ns, "root": os.path.relpath(root, tmp)})
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return cached_root()


def resolve_data_path(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                      progress: bool | None = None) -> Path:
    """A data location -> a local folder.

    A folder is returned as-is (resolved), a shard folder too; a brace pattern or comma-separated
    list of tar shards is returned unchanged (:func:`open_image_dataset` reads it in place); a
    ``.tar``/``.tar.gz``/``.tgz`` archive is unpacked once into ``cache_dir`` (default
    :func:`default_cache_dir`) and the folder that contains ``train/`` is returned.
    """
    from ssl_xcit.data.shards import looks_like_shards
    p = Path(path).expanduser()
    if not p.exists() and looks_like_shards(p):  # a brace pattern or comma list of shards: read in place
        return p
    if not p.exists():
        raise FileNotFoundError(f"data path {p} does not exist")
    if p.is_dir():
        return p.resolve()
    if _archive_stem(p) is None:
        raise ArchiveError(f"data path {p} is a file but not a supported archive "
                           f"(expected a folder or {', '.join(ARCHIVE_SUFFIXES)})")
    return extract_archive(p, cache_dir, progress)


def download_cifar10(dest: str | os.PathLike, progress: bool | None = None) -> Path:
    """Download CIFAR-10 with torchvision and write ``dest/cifar10/{train,val}/<class>/NNNNN.png``.

    Only call when asked: it needs the network. ``NNNNN`` is the image's index in its official
    split; ``val`` is the official test set. Written to a temporary folder and renamed, so an
    interrupted conversion is redone rather than half-used. Returns ``dest/cifar10``.
    """
    import torchvision.datasets
    from PIL import Image

    dest = Path(dest).expanduser().resolve()
    out = dest / "cifar10"
    if (out / MARKER).exists():
        return out
    if out.exists():
        raise RuntimeError(f"{out} exists but is not a complete conversion (no {MARKER}); delete it and retry")
    dest.mkdir(parents=True, exist_ok=True)
    show = is_rank0() if progress is None else progress
    tmp = Path(tempfile.mkdtemp(prefix=".cifar10.tmp-", dir=dest))
    try:
        for split, train in (("train", True), ("val", False)):
            ds = torchvision.datasets.CIFAR10(root=str(dest), train=train, download=True)
            classes = list(getattr(ds, "classes", CIFAR10_CLASSES))
            if len(ds.data) != len(ds.targets):
                raise ValueError(f"CIFAR-10 {split}: {len(ds.data)} images but {len(ds.targets)} labels")
            for name in classes:
                (tmp / split / name).mkdir(parents=True, exist_ok=True)
            items = range(len(ds.data))
            if show:
                from tqdm import tqdm
                items = tqdm(items, desc=f"writing CIFAR-10 {split}", unit="img")
            for i in items:
                Image.fromarray(ds.data[i]).save(tmp / split / classes[int(ds.targets[i])] / f"{i:05d}.png")
        atomic_write_json(tmp / MARKER, {"source": "torchvision.datasets.CIFAR10"})
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def open_image_dataset(path: str | os.PathLike | list, transform=None, *, progress: bool | None = None,
                       cache_dir: str | os.PathLike | None = None, draft_side: int | None = None):
    """The dataset of an image location: :class:`~ssl_xcit.data.shards.ShardImages` for tar shards
    (a folder of them, a brace pattern, a list), else :class:`~ssl_xcit.data.folders.ImageFiles`.

    Both return ``(sample, label, index)`` (``None`` for a corrupt image) and offer ``select``,
    ``targets`` and ``classes``, so a caller changes one line to read either. The folder listing
    and a scanned shard index are cached in ``cache_dir`` (default :func:`default_cache_dir`) under
    a lock: at 1.28M images the first rank lists once, the others and later jobs reuse the result.
    ``draft_side``: JPEGs much larger than it decode at reduced scale (see
    :func:`~ssl_xcit.data.common.load_rgb`), for a transform that resizes the shorter side to it.
    """
    from ssl_xcit.data.shards import ShardImages, looks_like_shards
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if looks_like_shards(path):
        ds = ShardImages(path, transform, index_cache_dir=cache / "shard-index", progress=progress)
    else:
        from ssl_xcit.data.folders import ImageFiles
        ds = ImageFiles(path, transform, listing_cache_dir=cache / "listings", progress=progress)
    ds.draft_side = draft_side
    return ds

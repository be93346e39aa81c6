"""Reading images: folder vs tar shards, and start-up at ImageNet scale.

1. **Read + decode throughput** (images/s on one core, ``OMP_NUM_THREADS=1``, no DataLoader
   workers) of the same images, in the training sampler's global random order:
   the reference is ``ImageFiles`` on the folder (what users run today); against it, ``ShardImages``
   on shards made by ``make_shards``, and -- if ``wids`` is installed -- webdataset's indexed reader
   ``wids.ShardListDataset`` on the same shards (LRU of 10 open shards, its default).
2. **Start-up at 1.28M files** (``--startup``): a synthetic tree of 1,281,167 EMPTY files in 1,000
   class folders (made in ``--tmp``, deleted afterwards): the folder listing without cache, the
   listing cache's first build and its reuse (what the other ranks and requeued jobs do), and
   opening a shard index of 1.28M samples (148 shards' ``.idx.npy`` files + manifest, written
   synthetically: only the index is opened, no image is read).

    python benchmarks/data_sources.py --data /tmp/ssl_xcit_test_cache/cifar10/train --images 5000
    python benchmarks/data_sources.py --startup --tmp /tmp
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402


def _rate(dataset, order, repeats: int = 1) -> float:
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in order:
            item = dataset[int(i)]
            assert item is not None
        best = max(best, len(order) / (time.perf_counter() - t0))
    return best


def throughput(data: Path, n_images: int, shard_size: str, work: Path) -> dict:
    import torch
    from ssl_xcit.data.folders import ImageFiles
    from ssl_xcit.data.make_shards import write_split
    from ssl_xcit.data.sampler import ResumableDistributedSampler
    from ssl_xcit.data.subsets import evenly_spread
    from ssl_xcit.data.shards import ShardImages

    torch.set_num_threads(1)
    folder = ImageFiles(data, progress=False)
    keep = evenly_spread(len(folder), n_images)
    subset = work / "subset"
    for i in keep:  # a real folder (hard links) of the chosen images, so both sources hold the same
        src = folder.path(int(i))
        dst = subset / src.relative_to(folder.root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, dst)
    t0 = time.perf_counter()
    manifest = write_split(subset, work / "shards", __import__("ssl_xcit.data.make_shards", fromlist=["x"])
                           .parse_size(shard_size), progress=False)
    make_s = time.perf_counter() - t0
    ref = ImageFiles(subset, progress=False)
    t0 = time.perf_counter()
    sh = ShardImages(work / "shards")
    open_s = time.perf_counter() - t0
    from ssl_xcit.data.shards import _scan_all, shard_paths
    t0 = time.perf_counter()
    _scan_all(shard_paths(work / "shards"), None, False)  # foreign shards: no index, headers read once
    scan_s = time.perf_counter() - t0
    order = [i for i, _ in ResumableDistributedSampler(len(ref), 1, seed=0)]
    out = {"images": len(ref), "shards": len(manifest["shards"]), "shard_size": shard_size,
           "make_shards_s": round(make_s, 2), "open_index_s": round(open_s, 3),
           "scan_headers_img_s": round(len(ref) / scan_s)}
    # interleave the runs so a load change on the shared machine hits both alike
    rates = {"folder": [], "shards": [], "wids": []}
    wds = _wids_dataset(work / "shards", manifest)
    for _ in range(2):
        rates["folder"].append(_rate(ref, order))
        rates["shards"].append(_rate(sh, order))
        if wds is not None:
            rates["wids"].append(_rate_wids(wds, order))
    out.update({f"{k}_img_s": round(max(v), 1) for k, v in rates.items() if v})
    out["shards_vs_folder"] = round(max(rates["shards"]) / max(rates["folder"]), 2)
    if rates["wids"]:
        out["wids_vs_folder"] = round(max(rates["wids"]) / max(rates["folder"]), 3)
    return out


def _wids_dataset(folder: Path, manifest: dict):
    try:
        import contextlib
        import io
        import wids
    except ImportError:
        return None
    shards = [{"url": str(folder / s["name"]), "nsamples": s["samples"]} for s in manifest["shards"]]
    with contextlib.redirect_stderr(io.StringIO()):  # wids prints a line on every construction
        return wids.ShardListDataset(shards, cache_dir=str(folder / ".wids_cache"), transformations=[])


def _rate_wids(wds, order) -> float:
    from PIL import Image
    import io
    t0 = time.perf_counter()
    for i in order:
        sample = wds[int(i)]
        ext = next(k for k in sample if k in (".jpg", ".png", ".jpeg", ".webp"))
        with Image.open(io.BytesIO(sample[ext].getvalue())) as img:
            img.convert("RGB")
    return len(order) / (time.perf_counter() - t0)


def startup(tmp: Path, n_files: int = 1_281_167, n_classes: int = 1000) -> dict:
    from ssl_xcit.data.folders import load_listing, scan_images
    from ssl_xcit.data.shards import ShardImages, FORMAT, FORMAT_VERSION, INDEX_SUFFIX, MANIFEST
    root = Path(tempfile.mkdtemp(prefix="ssl_xcit_1p28M_", dir=tmp))
    out: dict = {"files": n_files, "classes": n_classes}
    try:
        t0 = time.perf_counter()
        per = np.full(n_classes, n_files // n_classes)
        per[: n_files - per.sum()] += 1
        for c in range(n_classes):
            d = root / "train" / f"n{c:08d}"
            d.mkdir(parents=True)
            for j in range(per[c]):
                os.close(os.open(d / f"n{c:08d}_{j}.JPEG", os.O_CREAT | os.O_WRONLY, 0o644))
        out["create_tree_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        listing = scan_images(root / "train", progress=False)
        out["scan_no_cache_s"] = round(time.perf_counter() - t0, 2)
        assert len(listing.files) == n_files
        cache = root / "cache"
        t0 = time.perf_counter()
        load_listing(root / "train", cache_dir=cache, progress=False)
        out["cache_first_build_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        again = load_listing(root / "train", cache_dir=cache, progress=False)
        out["cache_reuse_s"] = round(time.perf_counter() - t0, 2)
        assert len(again.files) == n_files
        out["cache_file_mb"] = round(sum(f.stat().st_size for f in cache.glob("*.json")) / 1e6, 1)
        from ssl_xcit.data.folders import ImageFiles
        t0 = time.perf_counter()
        ImageFiles(root / "train", listing_cache_dir=cache, progress=False)
        out["imagefiles_from_cache_s"] = round(time.perf_counter() - t0, 2)

        # a shard index of the same size: 148 shards (ImageNet at ~1 GB each), index + manifest
        sh = root / "shards"
        sh.mkdir()
        n_shards, entries, start = 148, [], 0
        bounds = np.linspace(0, n_files, n_shards + 1).astype(np.int64)
        for k in range(n_shards):
            n = int(bounds[k + 1] - bounds[k])
            rows = np.zeros((n, 4), dtype=np.int64)
            rows[:, 0] = np.arange(bounds[k], bounds[k + 1])
            rows[:, 1] = 512 + np.arange(n) * 2048
            rows[:, 2] = 1000
            rows[:, 3] = (rows[:, 0] * n_classes) // n_files
            name = f"shard-{k:06d}.tar"
            (sh / name).write_bytes(b"")
            np.save(sh / (name + INDEX_SUFFIX), rows)
            entries.append({"name": name, "samples": n, "bytes": 0, "sha256": ""})
        (sh / MANIFEST).write_text(json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "images": n_files,
                                               "classes": [f"n{c:08d}" for c in range(n_classes)],
                                               "shards": entries}))
        t0 = time.perf_counter()
        ds = ShardImages(sh)
        out["shard_index_open_s"] = round(time.perf_counter() - t0, 2)
        assert len(ds) == n_files
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("/tmp/ssl_xcit_test_cache/cifar10/train"))
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--shard-size", default="1MB", help="small shards so that a small set spans many (default 1MB)")
    p.add_argument("--startup", action="store_true", help="the 1.28M-file start-up measurement (needs ~1.3M inodes)")
    p.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args()
    result = {"date": time.strftime("%Y-%m-%d"), "cpu_cores": os.cpu_count()}
    if args.startup:
        result["startup"] = startup(args.tmp)
    else:
        with tempfile.TemporaryDirectory(dir=args.tmp) as work:
            result["throughput"] = throughput(args.data, args.images, args.shard_size, Path(work))
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

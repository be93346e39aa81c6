#!/usr/bin/env python
"""Multi-crop data pipeline: PIL per image (``data.augment=cpu``) vs batched on the device (``gpu``).

Real JPEGs: CIFAR-10 images upsampled to 224-256 px (sides drawn per image) and written to a temp
folder, since no larger real set is at hand. Ratios are against the reference in the same run.

1. **Per CPU core** (one thread, no workers): the CPU path's ``dataset[i]`` (decode + PIL multi-crop,
   what a DataLoader worker does per image today) against the gpu path's worker part (decode + the
   parameter draws) and its batched augmentation on ``--device`` (on the CPU: one core too).
2. **CPU quickstart** (configs/quickstart.yaml: 32-px CIFAR-10, 2 global crops, no local crops):
   augmentation alone, batches of 32 and 64, one thread.
3. **End to end** (``--device cuda``): JPEG files -> loss with ``--workers`` DataLoader workers:
   PIL augmentation + the official DINO step (``benchmarks/bench_train_step.py``) against gpu
   augmentation + the ssl_xcit step; steady state (the workers' prefetch is drained first).

    python benchmarks/data_pipeline.py --device cpu            # sections 1-2 on this machine
    python benchmarks/data_pipeline.py --device cuda           # + section 3 (benchmarks/gpu_suite.sh)
    python benchmarks/data_pipeline.py --quick                 # tiny sizes: checks the script runs
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402

from ssl_xcit.data.folders import ImageFiles, collate_skip_corrupt  # noqa: E402
from ssl_xcit.data.gpu_multicrop import BatchedMultiCrop  # noqa: E402
from ssl_xcit.data.multicrop import DinoMultiCrop, MultiCropConfig  # noqa: E402
from ssl_xcit.data.sources import resolve_data_path  # noqa: E402
from ssl_xcit.data.subsets import evenly_spread  # noqa: E402
from ssl_xcit.distributed import pick_device  # noqa: E402

DEFAULT_DATA = "/tmp/ssl_xcit_test_cache/cifar10"
if not Path(DEFAULT_DATA).is_dir():
    DEFAULT_DATA = str(REPO.parent / "shared" / "data" / "cifar10.tar.gz")


def write_jpegs(src: ImageFiles, out: Path, n: int, lo: int, hi: int) -> Path:
    """``n`` evenly spread source images, upsampled (bicubic) to sides in [lo, hi], JPEG quality 90."""
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    for k, i in enumerate(evenly_spread(len(src), n)):
        w, h = (int(v) for v in rng.integers(lo, hi + 1, size=2))
        src.load(int(i)).resize((w, h), Image.BICUBIC).save(out / f"{k:05d}.jpg", quality=90)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def per_image_rate(dataset, n: int) -> float:
    """Images/s of ``dataset[(i, seed)]`` on this thread (the seeded call a worker makes)."""
    dataset[(0, 0)]
    t0 = time.perf_counter()
    for i in range(n):
        assert dataset[(i % len(dataset), i)] is not None
    return n / (time.perf_counter() - t0)


def batched_rate(root: Path, aug: BatchedMultiCrop, batch: int, device: torch.device, repeats: int) -> float:
    """Images/s of the batched augmentation alone (images already decoded, parameters drawn)."""
    ds = ImageFiles(root, aug.loader_transform, progress=False)
    b = collate_skip_corrupt([ds[(i % len(ds), i)] for i in range(batch)])
    if device.type == "cuda":
        b = b.pin_memory()
    aug(b.images, b.params, device)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        aug(b.images, b.params, device)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return batch / float(np.median(times))


def table(title: str, rows: list[tuple[str, float]], ref: float) -> None:
    print(f"\n{title}\n| {'pipeline':<58} | {'img/s':>8} | {'vs ref':>6} |\n|{'-' * 60}|{'-' * 10}|{'-' * 8}|")
    for name, rate in rows:
        print(f"| {name:<58} | {rate:8.1f} | {rate / ref:5.2f}x |")


def serial(*rates: float) -> float:
    """One core doing each stage in turn."""
    return 1.0 / sum(1.0 / r for r in rates)


def per_core(root: Path, mc: MultiCropConfig, a, device: torch.device, label: str) -> None:
    aug = BatchedMultiCrop(mc)
    cpu = per_image_rate(ImageFiles(root, DinoMultiCrop(mc), progress=False), a.cpu_images)
    decode = per_image_rate(ImageFiles(root, None, progress=False), a.gpu_images)
    worker = per_image_rate(ImageFiles(root, aug.loader_transform, progress=False), a.gpu_images)
    rows = [("cpu: decode + PIL multi-crop (reference)", cpu), ("  (decode alone)", decode),
            ("gpu: worker part, decode + parameter draws", worker)]
    for batch in a.batches:
        apply = batched_rate(root, aug, batch, device, a.repeats)
        rows.append((f"gpu: batched augmentation on {device.type}, batch {batch}", apply))
        if device.type == "cpu":
            rows.append((f"gpu: both on one core, batch {batch}", serial(worker, apply)))
    table(f"{label}, per CPU core (1 thread; crops {' + '.join(map(str, _crop_text(mc)))})", rows, cpu)


def _crop_text(mc: MultiCropConfig) -> list[str]:
    text = [f"2x{mc.global_crops_size}"]
    return text + ([f"{mc.local_crops_number}x{mc.local_crops_size}"] if mc.local_crops_number else [])


def end_to_end(root: Path, mc: MultiCropConfig, a, device: torch.device) -> None:
    from benchmarks.bench_train_step import OfficialStep, OursStep
    from ssl_xcit.train.config import load_config
    from ssl_xcit.train.loop import build_models
    cfg = load_config(None, [f"arch={a.arch}", f"out_dim={a.out_dim}", f"device={device.type}",
                             f"precision={a.precision}", "drop_path_rate=0.1"])
    ncrops = 2 + mc.local_crops_number
    warmup = a.warmup + 2 * a.workers       # the workers' prefetched batches are consumed before timing
    rows = []
    for name in ("PIL augmentation + official DINO step (reference)", f"gpu augmentation + ssl_xcit {a.precision} step"):
        torch.manual_seed(0)
        student, teacher = (m.to(device) for m in build_models(cfg))
        ref = name.startswith("PIL")
        step = (OfficialStep(student, teacher, a.out_dim, ncrops, device) if ref
                else OursStep(cfg, student, teacher, ncrops, device))
        aug = BatchedMultiCrop(mc)
        ds = ImageFiles(root, DinoMultiCrop(mc) if ref else aug.loader_transform, progress=False)
        loader = DataLoader(ds, batch_size=a.batch, num_workers=a.workers, collate_fn=collate_skip_corrupt,
                            sampler=RandomSampler(ds, replacement=True, num_samples=a.batch * (warmup + a.steps)),
                            pin_memory=device.type == "cuda", drop_last=True)
        for k, batch in enumerate(loader):
            if k == warmup:
                _sync(device)
                t0 = time.perf_counter()
            crops = ([c.to(device, non_blocking=True) for c in batch.crops] if ref
                     else aug(batch.images, batch.params, device))
            step(crops)
        _sync(device)
        rows.append((name, a.batch * a.steps / (time.perf_counter() - t0)))
        del step, student, teacher, loader
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    table(f"End to end, JPEG files -> loss ({card}, {a.workers} workers, {a.arch}, batch {a.batch}, "
          f"crops {' + '.join(_crop_text(mc))})", rows, rows[0][1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="CIFAR-10 folder or .tar.gz (its train/ is used)")
    p.add_argument("--device", default="auto")
    p.add_argument("--images", type=int, default=512, help="upsampled JPEGs written")
    p.add_argument("--side", type=int, nargs=2, default=[224, 256], help="upsampled sides drawn in this range")
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--local-crops", type=int, default=10)
    p.add_argument("--cpu-images", type=int, default=60, help="images timed through the PIL path")
    p.add_argument("--gpu-images", type=int, default=200, help="images timed through decode / the worker part")
    p.add_argument("--batches", type=int, nargs="+", default=[64], help="batch sizes of the batched augmentation")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quickstart-images", type=int, default=400, help="images timed in the quickstart section")
    p.add_argument("--arch", default="xcit_small_12_p16")
    p.add_argument("--out-dim", type=int, default=65536)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch", type=int, default=64, help="end to end: batch per step")
    p.add_argument("--steps", type=int, default=10, help="end to end: timed steps")
    p.add_argument("--warmup", type=int, default=3, help="end to end: steps before timing (+ 2 per worker)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="end to end: DataLoader workers")
    p.add_argument("--end-to-end", action="store_true", help="run section 3 on the CPU too (on cuda it always runs)")
    p.add_argument("--quick", action="store_true", help="tiny sizes on the CPU: checks that the script runs")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    if a.quick:
        a.images, a.side, a.global_size, a.local_size, a.local_crops = 24, [64, 72], 32, 16, 2
        a.cpu_images, a.gpu_images, a.repeats, a.quickstart_images, a.batches = 8, 8, 1, 32, [8]
        a.arch, a.out_dim, a.batch, a.steps, a.warmup, a.workers = "xcit_nano_12_p16", 256, 4, 2, 1, 1
        a.precision, a.end_to_end = "fp32", True
    torch.set_num_threads(1)
    device = pick_device(a.device)
    data = resolve_data_path(a.data)
    src = ImageFiles(data / "train" if (data / "train").is_dir() else data, progress=False)
    print(f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {os.cpu_count()} CPUs, device {device}; "
          f"{a.images} CIFAR-10 JPEGs upsampled to {a.side[0]}-{a.side[1]} px")
    with tempfile.TemporaryDirectory(prefix="data_pipeline_") as tmp:
        big = write_jpegs(src, Path(tmp) / "big", a.images, *a.side)
        mc = MultiCropConfig(global_crops_size=a.global_size, local_crops_size=a.local_size,
                             local_crops_number=a.local_crops)
        per_core(big, mc, a, device, f"Upsampled JPEGs, {a.side[0]}-{a.side[1]} px")
        small = write_jpegs(src, Path(tmp) / "small", min(a.quickstart_images, 400), 32, 32)
        quick_mc = MultiCropConfig(global_crops_size=32, local_crops_number=0)
        b = argparse.Namespace(**{**vars(a), "cpu_images": a.quickstart_images, "gpu_images": a.quickstart_images,
                                  "batches": [32, 64] if not a.quick else [8], "repeats": max(a.repeats, 5)})
        per_core(small, quick_mc, b, torch.device("cpu"), "CPU quickstart, 32-px CIFAR-10 JPEGs (augmentation alone)")
        if device.type == "cuda" or a.end_to_end:
            end_to_end(big, mc, a, device)


if __name__ == "__main__":
    main()

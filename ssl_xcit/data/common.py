"""What the data modules share: reading one image, parsing a dataset index, the ImageNet
normalisation, and whether this process is rank 0 (which shows progress bars).

Why a module of its own: :mod:`~ssl_xcit.data.folders`, :mod:`~ssl_xcit.data.shards`,
:mod:`~ssl_xcit.data.sources` and :mod:`~ssl_xcit.data.make_shards` all need these pieces, and
borrowing them from one another (private names included) made folders, sources and shards import
each other in a cycle. This module imports no other data module, so each of them imports it and
none needs another for its helpers.
"""
from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

# What PIL raises for unreadable, truncated or non-image files (UnidentifiedImageError is an OSError).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

# The normalisation of every ImageNet-trained network here (DINO, XCiT, timm): RGB mean and std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit greys (modes ``I;16*``, or ``I`` holding 16-bit values) -> ``L`` scaled by 255/65535.

    PIL's ``convert("RGB")`` clips such values at 255 instead of scaling them, which turned
    nearly every pixel of a 16-bit PNG white. A 32-bit ``I`` image whose values do not fit in
    16 bits is scaled by its own range. (16-bit RGB PNGs already open as 8-bit ``RGB``.)
    """
    if not (img.mode == "I" or img.mode.startswith("I;16")):
        return img
    arr = np.asarray(img, dtype=np.float64)
    low, high = float(arr.min(initial=0)), float(arr.max(initial=0))
    if low >= 0 and high <= 65535:
        scaled = arr * (255.0 / 65535.0)
    else:
        scaled = (arr - low) * (255.0 / max(high - low, 1.0))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def load_rgb(path: str | Any, draft_side: int | None = None) -> Image.Image:
    """Open and fully decode an image (a path or a binary file object) as 8-bit RGB.

    ``load`` forces truncated files to fail here (with one of :data:`DECODE_ERRORS`); 16-bit greys
    are scaled, not clipped.

    ``draft_side``: the shorter side the caller will resize the image to. A JPEG at least 4x that
    side is then decoded by libjpeg at 1/2, 1/4 or 1/8 scale (PIL's draft mode), to the smallest
    scale that keeps both sides at least 2x ``draft_side``. Why: scoring 224-px photos at 32 px
    (the quickstart's k-NN) spent most of its image time decoding and then shrinking pixels it
    throws away; the reduced decode plus the caller's antialiased resize stays within about a grey
    level on average of the full decode and resize (``tests/test_decode_once.py``). Smaller
    images (CIFAR-10's 32 px at a 32-px side) and other formats decode exactly as without it.
    """
    with Image.open(path) as img:
        if draft_side is not None and min(img.size) >= 4 * draft_side:
            img.draft(None, (2 * draft_side, 2 * draft_side))
        img.load()
        return _to_8bit(img).convert("RGB")


def read_size(path: str | Any) -> tuple[int, int]:
    """``(width, height)`` of an image (a path or a binary file object) from its header alone:
    nothing is decoded, so it costs a read of the first bytes, not a decode."""
    with Image.open(path) as img:
        return img.size


def parse_index(item: Any, length: int) -> tuple[int, int | None]:
    """``int`` or ``(index, sample_seed)`` -> (index, seed or None), with clear errors."""
    seed: int | None = None
    if isinstance(item, (tuple, list)):
        if len(item) != 2:
            raise TypeError(f"dataset index must be an int or an (index, sample_seed) pair, got {item!r}")
        item, seed_raw = item
        if isinstance(seed_raw, torch.Tensor):
            seed_raw = seed_raw.item()
        if isinstance(seed_raw, bool) or not isinstance(seed_raw, (int, np.integer)):
            raise TypeError(f"sample_seed must be an int, got {type(seed_raw).__name__} ({seed_raw!r})")
        seed = int(seed_raw)
        if not 0 <= seed < 2**64:
            raise ValueError(f"sample_seed must be in [0, 2**64), got {seed}")
    if isinstance(item, torch.Tensor) and item.numel() == 1:
        item = item.item()
    if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
        raise TypeError(f"dataset index must be an int or an (index, sample_seed) pair, got "
                        f"{type(item).__name__} ({item!r})")
    index = int(item)
    if not 0 <= index < length:
        raise IndexError(f"dataset index {index} is out of range for {length} images")
    return index, seed


def selection(indices: Sequence[int] | np.ndarray, length: int) -> np.ndarray:
    """``indices`` as a 1-d int64 array within ``[0, length)``, for ``select`` of any image dataset."""
    idx = np.asarray(indices, dtype=np.int64)
    if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= length)):
        raise IndexError(f"select: indices must be a 1-d list within [0, {length})")
    return idx


def run_seeded(fn: Callable[[Any], Any], arg: Any, seed: int) -> Any:
    """Call ``fn(arg)`` with torch, Python ``random`` and NumPy seeded from ``seed`` only.

    The caller's random states are restored afterwards, so the result depends on ``seed`` alone,
    not on which worker runs it or what ran before. Only the CPU torch generator is seeded:
    ``torch.manual_seed`` would also reseed CUDA, which ``fork_rng(devices=[])`` does not restore.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            return fn(arg)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

"""Small synthetic image folders and feature exports for the search / duplicates / copy-detection
tests: made here from a seed (no shared data needed), tiny enough for the fast suite."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

ARCH = "xcit_nano_12_p16"   # a random-init backbone: the fastest the zoo has
CROP = 32


def make_images(folder: Path, n: int, seed: int = 0, size: tuple[int, int] = (48, 40)) -> list[Path]:
    """``n`` distinct images (smooth colour blobs plus noise) as PNGs ``img000.png``..."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    paths = []
    for i in range(n):
        freq, phase = rng.uniform(1, 6, 3), rng.uniform(0, 6.3, 3)
        chans = [np.sin(freq[c] * (xx * rng.uniform(-3, 3) + yy * rng.uniform(-3, 3)) + phase[c]) for c in range(3)]
        arr = (np.stack(chans, -1) * 100 + 128 + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
        paths.append(folder / f"img{i:03d}.png")
        Image.fromarray(arr).save(paths[-1])
    return paths


def export_folder(folder: Path, out: Path, patch: bool = False, seed: int = 0, shard_size: int = 1000,
                  dtype: str = "float32", outputs: tuple[str, ...] | None = None, **kw) -> dict:
    """``folder`` exported as the command line would (its ``source`` recorded): ARCH from ``seed``."""
    from ssl_xcit.evaluate import backbone, datasets, export
    model = backbone.load_frozen_backbone(ARCH, seed=seed)
    ds = datasets.open_images(folder, datasets.eval_transform(CROP), progress=False)
    source = {"checkpoint": ARCH, "checkpoint_sha256": None, "arch": None, "checkpoint_key": "teacher",
              "crop_size": CROP, "resize": datasets.resize_for(CROP), "seed": seed}
    return export.export_features(model, ds, out, outputs=outputs or (("cls", "patch") if patch else ("cls",)),
                                  shard_size=shard_size, dtype=dtype, batch_size=16, num_workers=0,
                                  progress=False, source=source, **kw)

"""The quickstart's k-NN on photos much larger than its 32-px evaluation size (issue 33): JPEG draft
decoding (``load_rgb(..., draft_side=)``) stays close to the full decode and resize and never applies to
CIFAR-sized images; several backbones scored from one pass over the images
(``extract_features_each``) give each one's features bit for bit, and the quickstart decodes each
k-NN image once for its trained teacher and its random start."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_xcit.data.common import load_rgb
from ssl_xcit.data.sources import open_image_dataset
from ssl_xcit.evaluate.datasets import eval_transform


def photo(path: Path, size: tuple[int, int], seed: int = 0, quality: int = 90) -> Path:
    """A photo-like JPEG: smooth colour fields, a few edges, and sensor-like noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    chans = [np.sin(rng.uniform(2, 9) * (xx * rng.uniform(-2, 2) + yy * rng.uniform(-2, 2)) + rng.uniform(0, 6))
             for _ in range(3)]
    arr = np.stack(chans, -1) * 80 + 128
    arr[(xx - 0.5) ** 2 + (yy - 0.4) ** 2 < 0.05] -= 70          # an object with a sharp outline
    arr += rng.normal(0, 10, arr.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=quality)
    return path


def grey_levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of two normalised eval tensors, in 0-255 grey levels (the normalisation undone)."""
    std = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
    return ((a - b) * std * 255).abs()


@pytest.mark.parametrize("size", [(224, 224), (300, 224), (500, 375)])
def test_draft_decoding_stays_within_a_grey_level_of_the_full_decode_at_32_px(tmp_path, size):
    path = photo(tmp_path / "p.jpg", size)
    full = load_rgb(path)
    draft = load_rgb(path, draft_side=32)
    # decoded smaller (the point), yet both sides at least 2x the 32-px side the transform resizes to
    assert draft.size[0] < full.size[0] and min(draft.size) >= 64
    tf = eval_transform(32, resize=32)
    diff = grey_levels(tf(full), tf(draft))
    assert diff.mean() < 1.0 and diff.max() < 16, (float(diff.mean()), float(diff.max()))
    # the check can fail: the same image decoded at 1/8 scale (28 px) and enlarged is further off
    with Image.open(path) as img:
        img.draft(None, (img.size[0] // 8, img.size[1] // 8))
        coarse = img.convert("RGB")
    assert grey_levels(tf(full), tf(coarse)).mean() > 2 * diff.mean()


def test_draft_never_applies_to_cifar_sized_images_or_other_formats(tmp_path):
    small = photo(tmp_path / "c.jpg", (32, 32))
    assert np.array_equal(np.asarray(load_rgb(small, draft_side=32)), np.asarray(load_rgb(small)))
    mid = photo(tmp_path / "m.jpg", (120, 120))      # under 4x the side: a reduction would leave < 2x
    assert np.array_equal(np.asarray(load_rgb(mid, draft_side=32)), np.asarray(load_rgb(mid)))
    png = tmp_path / "p.png"
    Image.open(photo(tmp_path / "p.jpg", (224, 224))).save(png)
    assert load_rgb(png, draft_side=32).size == (224, 224)


def test_image_datasets_decode_at_draft_side_only_when_asked(tmp_path):
    photo(tmp_path / "f" / "a" / "x.jpg", (224, 224))
    tf = eval_transform(32, resize=32)
    plain = open_image_dataset(tmp_path / "f", tf, progress=False, cache_dir=tmp_path / ".c")
    drafted = open_image_dataset(tmp_path / "f", tf, progress=False, cache_dir=tmp_path / ".c", draft_side=32)
    path = tmp_path / "f" / "a" / "x.jpg"
    assert torch.equal(plain[0][0], tf(load_rgb(path)))
    assert torch.equal(drafted[0][0], tf(load_rgb(path, draft_side=32)))
    assert not torch.equal(plain[0][0], drafted[0][0])

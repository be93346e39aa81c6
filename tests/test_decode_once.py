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


ARCH = "xcit_nano_12_p16"   # the fastest random-init backbone of the zoo


def labelled_root(root: Path, side: int, per_class: int = 4) -> Path:
    """``root/{train,val}/{a,b,c}/*.jpg`` photo-like JPEGs of ``side`` px."""
    for split, n in (("train", per_class), ("val", 2)):
        for c, name in enumerate("abc"):
            for i in range(n):
                photo(root / split / name / f"{i}.jpg", (side, side), seed=100 * c + 10 * i + len(split))
    return root


def old_knn_predictions(checkpoint: str, root: Path, seed: int, ks=(3,)):
    """The quickstart's k-NN before issue 33, one backbone per pass over fully decoded images: the reference."""
    from ssl_xcit.evaluate.backbone import load_frozen_backbone
    from ssl_xcit.evaluate.features import extract_features
    from ssl_xcit.evaluate.knn import build_index, knn_predict, l2_normalize
    model = load_frozen_backbone(checkpoint, seed=seed)
    feats = {}
    for split in ("train", "val"):
        ds = open_image_dataset(root / split, transform=eval_transform(32, resize=32), progress=False)
        feats[split] = extract_features(model, ds, batch_size=256, num_workers=0, progress=False)
    (tf, ty), (vf, vy) = feats["train"], feats["val"]
    return knn_predict(build_index(l2_normalize(tf)), ty, l2_normalize(vf), vy, list(ks), temperature=0.07), vy


def test_several_backbones_from_one_pass_give_each_ones_features_bit_for_bit(tmp_path):
    from ssl_xcit.evaluate.backbone import load_frozen_backbone
    from ssl_xcit.evaluate.features import extract_features, extract_features_each
    root = labelled_root(tmp_path / "d", 32)
    (root / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg")      # skipped by both paths alike
    ds = open_image_dataset(root / "train", eval_transform(32, resize=32), progress=False, cache_dir=tmp_path / ".c")
    models = [load_frozen_backbone(ARCH, seed=s) for s in (0, 1)]
    feats, labels = extract_features_each(models, ds, batch_size=5, num_workers=0, progress=False)
    for model, got in zip(models, feats):
        want, want_labels = extract_features(model, ds, batch_size=5, num_workers=0, progress=False)
        assert got.shape == want.shape == (12, 128) and torch.equal(got, want) and torch.equal(labels, want_labels)
    assert not torch.equal(feats[0], feats[1])
    with pytest.raises(ValueError, match="eval"):
        extract_features_each([models[0], load_frozen_backbone(ARCH).train()], ds, num_workers=0, progress=False)


def test_quickstart_knn_decodes_each_image_once_for_both_backbones(tmp_path, monkeypatch):
    import ssl_xcit.data.folders as folders
    from ssl_xcit.commands.quickstart import knn_predictions_each
    root = labelled_root(tmp_path / "d", 32)
    decoded: list[str] = []

    def counting(path, draft_side=None):
        decoded.append(path)
        return load_rgb(path, draft_side)
    monkeypatch.setattr(folders, "load_rgb", counting)
    (first, second), val_y = knn_predictions_each([(ARCH, 0), (ARCH, 1)], root, crop=32, n_train=100, n_val=100,
                                                  ks=[3], device=torch.device("cpu"), num_workers=0)
    assert len(decoded) == len(set(decoded)) == 12 + 6
    # CIFAR-sized images: what the quickstart printed before, bit for bit, for each backbone
    for got, seed in ((first, 0), (second, 1)):
        want, want_y = old_knn_predictions(ARCH, root, seed)
        assert torch.equal(val_y, want_y) and torch.equal(got[3].top5, want[3].top5)
        assert got[3].top1_acc == want[3].top1_acc


def test_quickstart_knn_decodes_large_photos_at_reduced_scale(tmp_path, monkeypatch):
    import ssl_xcit.data.folders as folders
    from ssl_xcit.commands.quickstart import knn_predictions_each
    root = labelled_root(tmp_path / "d", 224, per_class=2)
    sizes: list[tuple[int, int]] = []

    def recording(path, draft_side=None):
        sizes.append(load_rgb(path, draft_side).size)
        return load_rgb(path, draft_side)
    monkeypatch.setattr(folders, "load_rgb", recording)
    knn_predictions_each([(ARCH, 0)], root, crop=32, n_train=100, n_val=100, ks=[1], device=torch.device("cpu"),
                         num_workers=0)
    assert sizes == [(112, 112)] * 12

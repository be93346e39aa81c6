"""The labelled images of a fine-tuning run: ``train/`` and ``val/`` with the same classes, DINO's
few-label subsets, and timm's training transform.

Checked before anything is trained, each as one line: no ``val/``, a class that one split has and
the other lacks, a label outside the classes (tar shards carry their own), and a subset asking for
more labelled images than a class has.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ssl_xcit.data.sources import open_image_dataset, resolve_data_path
from ssl_xcit.errors import UserError


class LabelledDataError(UserError, ValueError):
    """Labelled images that cannot be fine-tuned on; the message says what to change."""


def labelled_splits(data_path: str) -> tuple[Any, Any]:
    """(train, val) datasets of ``data_path`` (a folder or archive with ``train/`` and ``val/``)."""
    if not data_path:
        raise LabelledDataError("data_path is empty: give data_path=/path/to/images with train/ and val/ "
                                "class folders (or a .tar.gz of one)")
    root = resolve_data_path(data_path)
    for split in ("train", "val"):
        if not (root / split).exists():
            raise LabelledDataError(f"data_path {root} has no {split}/ folder: fine-tuning needs labelled "
                                    "train/ and val/ class folders (<root>/train/<class>/<image>)")
    train, val = (open_image_dataset(root / split, progress=False) for split in ("train", "val"))
    check_labels(train, val, root)
    return train, val


def check_labels(train: Any, val: Any, root: Path) -> None:
    """The same classes on both sides, every label one of them."""
    if not train.classes:
        raise LabelledDataError(f"{root / 'train'} has no class folders: fine-tuning needs labelled images "
                                "(<root>/train/<class>/<image>)")
    if list(train.classes) != list(val.classes):
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        parts = [f"{what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                 for what, names in (("only in train/", only_train), ("only in val/", only_val)) if names]
        raise LabelledDataError(f"{root}: train/ and val/ must have the same class folders ("
                                + "; ".join(parts or ["in another order"]) + ")")
    n = len(train.classes)
    for split, ds in (("train", train), ("val", val)):
        labels = np.asarray(ds.targets)
        bad = labels[(labels < 0) | (labels >= n)]
        if bad.size:
            raise LabelledDataError(f"{root / split}: {bad.size} image(s) have label {int(bad[0])}, outside the "
                                    f"{n} classes 0..{n - 1}")


def few_labels(targets: list[int] | np.ndarray, fraction: float = 1.0, per_class: int = 0,
               seed: int = 0) -> np.ndarray:
    """The labelled train images a run uses, as sorted indices: ``per_class`` of each class, or
    ``fraction`` of each (at least one), evenly spread over the class's images (one every
    ``len / want``) from a phase the seed draws (DINO's 1% / 10% protocol fixes its subsets; here
    the seed does, and another seed takes other images).

    >>> few_labels([0] * 6 + [1] * 6, per_class=2, seed=0).tolist()
    [1, 4, 6, 9]
    """
    targets = np.asarray(targets)
    if per_class <= 0 and fraction >= 1.0:
        return np.arange(len(targets))
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        want = per_class if per_class > 0 else max(1, int(round(fraction * len(members))))
        if want > len(members):
            raise LabelledDataError(f"labels_per_class={per_class}: class {int(label)} has only {len(members)} "
                                    "train images")
        step = len(members) / want
        phase = rng.uniform(0, step) if want < len(members) else 0.0
        keep.append(members[np.floor(phase + step * np.arange(want)).astype(np.int64)])
    return np.sort(np.concatenate(keep))


def train_transform(cfg: Any, mean: tuple[float, ...], std: tuple[float, ...]):
    """timm's training transform (DeiT's): random resized crop, flip, RandAugment, random erasing."""
    from timm.data import create_transform
    d = cfg.data
    policy = None if d.auto_augment in ("", "none") else d.auto_augment
    transform = create_transform(d.input_size, is_training=True, scale=tuple(d.crop_scale), auto_augment=policy,
                                 color_jitter=d.color_jitter, re_prob=d.reprob, re_mode="pixel", re_count=1,
                                 interpolation="bicubic", mean=mean, std=std)
    _posterize_as_published(transform)
    return transform


def _posterize_as_published(transform: Any) -> None:
    """DeiT's ``rand-m9-mstd0.5-inc1`` draws magnitudes up to 10, where timm's increasing posterize
    keeps 0 bits. Pillow up to 12 turned that into a black image; Pillow 13 raises "bits must be
    between or equal to 1 and 8" and kills the data-loading worker (about 1 image in 300). The
    published behaviour is kept: 0 bits give the black image the recipe was tuned with."""
    from PIL import Image
    from timm.data import auto_augment
    published = auto_augment.posterize

    def posterize(img, bits_to_keep, **kwargs):
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size)
        return published(img, bits_to_keep, **kwargs)
    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", []):
            if getattr(op, "aug_fn", None) is published:
                op.aug_fn = posterize

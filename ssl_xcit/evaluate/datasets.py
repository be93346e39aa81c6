"""The images an evaluation reads: DINO's eval and linear-probe transforms, a folder or tar shards
opened as the project's dataset, and the train/ and val/ splits with the same classes."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ssl_xcit.data.common import IMAGENET_MEAN, IMAGENET_STD
from ssl_xcit.errors import SETTING, named
from ssl_xcit.evaluate.backbone import load_frozen_backbone

if TYPE_CHECKING:
    import torch
from ssl_xcit.evaluate.inputs import EvalInputError, check_positive
from ssl_xcit.evaluate.runtime import EvalEnv


class MissingSplitError(EvalInputError, FileNotFoundError):
    """A data folder without the train/ or val/ an evaluation reads (a ``FileNotFoundError``, as before)."""


def resize_for(crop_size: int, resize: int | None = None) -> int:
    """DINO's ratio: resize 256 for a 224 crop, scaled for other crop sizes."""
    check_positive(crop_size, "crop_size")
    if resize is None:
        return int(round(crop_size * 256 / 224))
    check_positive(resize, "resize")
    if resize < crop_size:
        raise named(EvalInputError, f"{SETTING} {resize} is smaller than the crop size {crop_size}", "resize")
    return resize


def eval_transform(crop_size: int | tuple[int, int] = 224, resize: int | tuple[int, int] | None = None,
                   mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                   interpolation: str = "bicubic"):
    """Resize (bicubic) -> centre crop -> tensor -> normalisation (ImageNet's), DINO's eval transform.

    The one eval transform of the project: k-NN, linear probes, exports and the k-NN monitor use
    it as it is; eval_classification with a model's own ``data_config`` (:func:`transform_for`).
    ``crop_size``/``resize`` may be ``(H, W)``; an int ``resize`` is the shorter side (default
    DINO's ratio, 256 for a 224 crop; only for an int crop).
    """
    from torchvision import transforms as T
    if resize is None or isinstance(resize, int):
        if isinstance(crop_size, int):
            resize = resize_for(crop_size, resize)
        elif resize is None:
            raise ValueError("eval_transform: give resize for a non-square crop")
    modes = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}
    return T.Compose([T.Resize(resize, interpolation=modes[interpolation]), T.CenterCrop(crop_size),
                      T.ToTensor(), T.Normalize(mean, std)])


def transform_for(data_config: dict):
    """:func:`eval_transform` as a timm-style ``data_config`` asks (an XCiT's ``model.data_config``):
    the shorter side resized to ``input size / crop_pct``, centre-cropped to the input size, the
    config's mean and std."""
    _, h, w = data_config["input_size"]
    crop_pct = data_config.get("crop_pct", 1.0)
    resize = int(h / crop_pct) if h == w else (int(h / crop_pct), int(w / crop_pct))
    return eval_transform((h, w) if h != w else h, resize, data_config["mean"], data_config["std"],
                          data_config.get("interpolation", "bicubic"))


def probe_train_transform(crop_size: int = 224):
    """RandomResizedCrop + horizontal flip, DINO's linear-probe training transform (fine-tuning's, with
    RandAugment and random erasing, is :func:`ssl_xcit.finetune.data.train_transform`)."""
    from torchvision import transforms as T
    check_positive(crop_size, "crop_size")
    return T.Compose([T.RandomResizedCrop(crop_size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def resolve_root(data_path: str | os.PathLike) -> Path:
    """A folder as-is, or a .tar/.tar.gz unpacked once (ssl_xcit.data.sources)."""
    from ssl_xcit.data.sources import resolve_data_path
    return Path(resolve_data_path(data_path))


def open_images(root: str | os.PathLike, transform, progress: bool | None = None) -> "torch.utils.data.Dataset":
    """The project's image dataset: a folder (class or flat layout) or tar shards; ``None`` for corrupt files.
    ``progress=False`` silences the listing's progress bar."""
    from ssl_xcit.data.sources import open_image_dataset
    return open_image_dataset(root, transform, progress=progress)


def open_split(data_root: Path, split: str, transform, need_labels: bool = True, progress: bool | None = None):
    folder = Path(data_root) / split
    if not folder.is_dir():
        raise named(MissingSplitError, f"{SETTING} {data_root} has no {split}/ folder (expected train/ and val/)",
                    "data_path")
    ds = open_images(folder, transform, progress)
    if need_labels and not getattr(ds, "classes", None):
        raise EvalInputError(f"{folder} has no class sub-folders: this evaluation needs labelled images "
                             f"({folder}/<class>/<image>)")
    return ds


def check_same_classes(train_ds, val_ds, data_root: Path) -> list[str]:
    if list(train_ds.classes) != list(val_ds.classes):
        only_t = sorted(set(train_ds.classes) - set(val_ds.classes))
        only_v = sorted(set(val_ds.classes) - set(train_ds.classes))
        raise EvalInputError(f"{data_root}: train/ and val/ class folders differ (only in train: {only_t[:5]}, "
                         f"only in val: {only_v[:5]}); labels would not match")
    return list(train_ds.classes)


def open_splits(args):
    """``(train_ds, val_ds, classes)`` for the tools that read train/ and val/ (k-NN, linear; ``args``:
    their settings, :class:`ssl_xcit.evaluate.inputs.SourceSettings`): DINO's eval transform on both
    splits, the same classes checked."""
    root = resolve_root(args.data_path)
    tf = eval_transform(args.crop_size, args.resize)
    progress = None if getattr(args, "progress", True) else False
    train_ds = open_split(root, "train", tf, progress=progress)
    val_ds = open_split(root, "val", tf, progress=progress)
    return train_ds, val_ds, check_same_classes(train_ds, val_ds, root)


def open_splits_and_backbone(args, env: EvalEnv):
    """The frozen backbone, then :func:`open_splits`: ``(train_ds, val_ds, classes, model)``. The
    checkpoint first: a bad one is reported in seconds, before a large folder is listed."""
    model = load_frozen_backbone(args.checkpoint, args.arch, args.checkpoint_key, env.device, seed=args.seed,
                                 crop_size=args.crop_size)
    train_ds, val_ds, classes = open_splits(args)
    return train_ds, val_ds, classes, model

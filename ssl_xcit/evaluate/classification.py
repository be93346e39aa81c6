"""Top-1 / top-5 accuracy of an XCiT classifier on an ImageFolder validation set.

Why: the quickest proof that a checkpoint was read correctly is the published accuracy of the
published weights; the same tool scores fine-tuned or linear-probed models.

Class indices follow the *sorted* class-folder names (torchvision ``ImageFolder``). For ImageNet
that is the standard index order of the 1000 synset folders (n01440764 = 0, ...), the order the
published heads use, so the folder must hold all classes of the head under their synset names.

Preprocessing is the model's own (:attr:`XCiT.data_config`): bicubic resize of the short side to
``img_size`` (crop ratio 1.0), centre crop, ImageNet mean / std.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Subset
from ssl_xcit.data.subsets import evenly_spread
from ssl_xcit.data.folders import Batch, ImageFiles, collate_skip_corrupt
from ssl_xcit.ranks import is_rank0
from ssl_xcit.errors import SETTING, named
from ssl_xcit.distributed import pick_device
from ssl_xcit.evaluate.datasets import transform_for
from ssl_xcit.evaluate.inputs import (SPECIAL_CHECKPOINTS, EvalInputError, MissingPathError,  # noqa: F401 (re-exported)
                                      check_positive, default_workers)

log = logging.getLogger(__name__)


@dataclass
class ClassificationConfig:
    model: str
    checkpoint: str  # a file, 'pretrained' (published weights of the model) or 'none' (random)
    data_path: str
    batch_size: int = 64
    device: str = "auto"
    limit: int | None = None
    num_workers: int = field(default_factory=default_workers)   # at most the usable cores
    img_size: int | None = None
    num_classes: int | None = None  # only for checkpoint 'none'; otherwise the checkpoint's head
    checkpoint_key: str = "teacher"
    format: str = "auto"
    allow_pickle: bool = False
    download: bool = False


def resolve_val_root(path: str | os.PathLike) -> Path:
    """``path`` itself when it holds class folders, or ``path/val`` (an ImageNet-style root)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise named(MissingPathError, f"{SETTING} {root}: folder not found", "data_path")
    if (root / "val").is_dir():
        return root / "val"
    if not any(p.is_dir() for p in root.iterdir()):
        raise named(EvalInputError, f"{SETTING} {root}: no class folders (expected <root>/<class>/<image> "
                    "or <root>/val/<class>/<image>)", "data_path")
    return root


def spread_subset(n_total: int, limit: int | None) -> list[int] | None:
    """Evenly spaced indices so that a ``limit`` look still covers all classes (ImageFolder
    orders images by class, so the first N images would all be class 0)."""
    if limit is None or limit >= n_total:
        return None
    if limit <= 0:
        raise named(EvalInputError, f"{SETTING} must be positive, got {limit}", "limit")
    return evenly_spread(n_total, limit).tolist()


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)
                 ) -> dict[int, int]:
    """Number of samples whose target is among the k highest logits, for each k (k capped at the
    number of classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top.eq(target[:, None])
    return {k: int(hit[:, :min(k, kmax)].any(dim=1).sum()) for k in ks}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device,
             progress: bool = True) -> dict[str, float]:
    """Top-1 / top-5 (percent) of ``model`` over ``loader``."""
    from tqdm import tqdm

    model.eval().to(device)
    n, skipped, correct = 0, 0, {1: 0, 5: 0}
    for batch in tqdm(loader, desc="eval", disable=not progress, leave=False):
        if isinstance(batch, Batch):   # the project's loader: corrupt images already dropped
            skipped += batch.n_skipped
            if batch.is_empty:
                continue
            images, target = batch.images, batch.labels
        else:
            images, target = batch
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        hits = topk_correct(model(images), target)
        n += target.numel()
        for k in correct:
            correct[k] += hits[k]
    if n == 0:
        raise EvalInputError(f"no images evaluated ({skipped} unreadable)")
    if skipped:
        log.warning("%d unreadable images skipped", skipped)
    return {"top1": 100.0 * correct[1] / n, "top5": 100.0 * correct[5] / n, "n_images": n,
            "n_skipped": skipped}


def _build_model(cfg: ClassificationConfig, n_dataset_classes: int):
    from ..models import build_model
    from ..models.checkpoints import load_into, load_state_source
    from ..models.factory import pretrained_file

    overrides = {"img_size": cfg.img_size} if cfg.img_size else {}
    if cfg.checkpoint == "none":
        log.warning("checkpoint 'none': evaluating a randomly initialised %s", cfg.model)
        return build_model(cfg.model, num_classes=cfg.num_classes or n_dataset_classes,
                           **overrides)
    try:
        path = pretrained_file(cfg.model, cfg.download) if cfg.checkpoint == "pretrained" \
            else Path(cfg.checkpoint)
    except ValueError as err:  # no published weights for this name
        raise named(EvalInputError, f"{SETTING} pretrained: {err}", "checkpoint") from None
    weights = load_state_source(path, cfg.format, cfg.checkpoint_key, cfg.allow_pickle)
    if not cfg.img_size and weights.img_size:   # a fine-tuning run's checkpoint: the resolution it trained at
        overrides = {"img_size": weights.img_size}
    head = weights.state_dict.get("head.weight")
    if head is None:
        raise EvalInputError(f"{path}: no classifier head in this checkpoint (a self-supervised "
                         "backbone needs a linear probe first); classification needs head.weight")
    model = build_model(cfg.model, num_classes=int(head.shape[0]), **overrides)
    load_into(model, weights, strict=True)
    return model


def _check_model_name(name: str) -> None:
    from ssl_xcit.models.zoo import resolve  # the name table: no torch
    try:
        resolve(name)
    except ValueError as err:
        raise named(EvalInputError, f"{SETTING}: {err}", "model") from None


def run(cfg: ClassificationConfig) -> dict:
    """Library entry: evaluate and return the result dict (also printed as one line)."""
    _check_model_name(cfg.model)  # unknown names fail before any data is touched
    check_positive(cfg.batch_size, "batch_size")
    device = pick_device(cfg.device)  # before minutes of work: cuda without a GPU fails here
    root = resolve_val_root(cfg.data_path)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    model = _build_model(cfg, len(classes))
    n_out = model.num_classes
    if len(classes) > n_out:
        raise named(EvalInputError, f"{SETTING} {root} has {len(classes)} class folders but the model "
                    f"predicts {n_out} classes", "data_path")
    if len(classes) < n_out:
        log.warning("%s has %d class folders, the model %d classes: indices follow the sorted "
                    "folder names, so results are only meaningful if they are the model's first "
                    "%d classes", root, len(classes), n_out, len(classes))
    # the project's dataset: same sorted class indices as torchvision's ImageFolder, but an
    # unreadable file is skipped and counted instead of stopping the evaluation
    dataset = ImageFiles(root, transform=transform_for(model.data_config))
    idx = spread_subset(len(dataset), cfg.limit)
    data = dataset if idx is None else Subset(dataset, idx)
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate_skip_corrupt,
                        num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    start = time.perf_counter()
    scores = evaluate(model, loader, device, progress=is_rank0())
    secs = time.perf_counter() - start
    result = {"model": cfg.model, "checkpoint": cfg.checkpoint, "data_path": str(root),
              "num_classes": n_out, "img_size": list(model.img_size), **scores,
              "seconds": secs}
    unreadable = f", {scores['n_skipped']} unreadable skipped" if scores["n_skipped"] else ""
    print(f"{cfg.model} [{cfg.checkpoint}] on {root} ({scores['n_images']} images{unreadable}, "
          f"{model.img_size[0]}x{model.img_size[1]}): top-1 {scores['top1']:.2f}%  "
          f"top-5 {scores['top5']:.2f}%  ({secs:.1f} s)", flush=True)
    return result

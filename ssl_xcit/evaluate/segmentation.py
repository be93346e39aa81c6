"""Linear semantic-segmentation probe of frozen patch features (DINOv2's "linear" protocol).

A BatchNorm and a 1x1 convolution on the frozen patch-feature map (the final normed patch tokens;
``n_blocks=4``: the last four XCA blocks, each through the final norm, concatenated: DINOv2's "+ms"
style input), logits upsampled bilinearly to the mask, cross-entropy ignoring 255; scored in mIoU on
a validation split, per class and mean, the intersections and unions summed over the whole split
(as mmsegmentation does) and at the masks' own resolution. The features are computed once per split
and cached (float16), so training the head costs no backbone pass.

Data: ``train/`` and ``val/`` folders each with an ``images/`` + ``masks/`` pair (PNG class indices,
255 ignored: ADE / VOC style), or a DAVIS folder (frames and their masks; foreground/background,
split by sequence).

Loss: DINOv2's plain cross-entropy by default (``class_weights="none"``), made for ADE's 150 classes.
``class_weights="balanced"`` weights each class by 1 / its pixel share of the train masks (chosen a
priori, not on the val split): on a fg/bg split with a small foreground (DAVIS: 6.5 % of the train
pixels) the plain loss's best linear rule is "all background", and mIoU, which counts each class
the same, then measures nothing but that. It is not the default because on DAVIS it did not change
the verdict (benchmarks/RESULTS.md, "Dense features") and the default stays DINOv2's protocol.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssl_xcit.errors import UserError

log = logging.getLogger(__name__)
IGNORE = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class SegmentationInputError(UserError, ValueError):
    """A segmentation data folder, split or setting this probe cannot use as given."""


@dataclass
class Pair:
    image: Path
    mask: Path
    group: str = ""       # the sequence of a DAVIS frame (the paired test's unit is the image)


# ----------------------------------------------------------------------------- data
def folder_pairs(split_dir: Path) -> list[Pair]:
    """``images/X.*`` with ``masks/X.png``; every image needs its mask and every mask its image."""
    images_dir, masks_dir = split_dir / "images", split_dir / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise SegmentationInputError(f"{split_dir}: no {d.name}/ folder (expected images/ and masks/ with "
                                         "the same file names, masks as PNG class indices)")
    images = {p.stem: p for p in sorted(images_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    masks = {p.stem: p for p in sorted(masks_dir.glob("*.png"))}
    lonely_images, lonely_masks = sorted(set(images) - set(masks)), sorted(set(masks) - set(images))
    if lonely_images or lonely_masks:
        parts = []
        if lonely_images:
            parts.append(f"{len(lonely_images)} image(s) without a mask (e.g. {images[lonely_images[0]].name})")
        if lonely_masks:
            parts.append(f"{len(lonely_masks)} mask(s) without an image (e.g. {masks[lonely_masks[0]].name})")
        raise SegmentationInputError(f"{split_dir}: {' and '.join(parts)}; every images/X needs masks/X.png")
    if not images:
        raise SegmentationInputError(f"{split_dir}: no images in images/")
    return [Pair(images[k], masks[k]) for k in sorted(images)]


def davis_pairs(root: Path, sequences: Sequence[str]) -> list[Pair]:
    """Every annotated frame of ``sequences`` of a DAVIS folder."""
    from ssl_xcit.evaluate.video_segmentation import davis_sequences
    out = []
    for seq in davis_sequences(root, names=list(sequences)):
        out += [Pair(f, seq.mask_path(f), seq.name) for f in seq.frames if seq.mask_path(f).is_file()]
    return out


def split_pairs(data_path: str | Path, train_sequences: Sequence[str] | None = None,
                val_sequences: Sequence[str] | None = None) -> tuple[list[Pair], list[Pair], str]:
    """(train, val, kind): a ``train/``+``val/`` folder of image/mask pairs ("folders"), or a DAVIS
    folder split by sequence ("davis": the first half of its sequences trains, the rest validate,
    unless given)."""
    from ssl_xcit.evaluate.video_segmentation import davis_root, davis_sequences
    root = Path(data_path).expanduser()
    if (root / "train").is_dir() or (root / "val").is_dir():
        for s in ("train", "val"):
            if not (root / s).is_dir():
                raise SegmentationInputError(f"{root}: has no {s}/ folder (expected train/ and val/, each with "
                                             "images/ and masks/)")
        return folder_pairs(root / "train"), folder_pairs(root / "val"), "folders"
    if not (davis_root(root) / "JPEGImages").is_dir():
        raise SegmentationInputError(f"{root}: neither train/ + val/ folders of images/ and masks/ nor a DAVIS "
                                     "folder (JPEGImages/, Annotations/)")
    names = [s.name for s in davis_sequences(root)]
    if train_sequences is None and val_sequences is None:
        half = math.ceil(len(names) / 2)
        train_sequences, val_sequences = names[:half], names[half:]
    train_sequences = list(train_sequences or [n for n in names if n not in (val_sequences or [])])
    val_sequences = list(val_sequences or [n for n in names if n not in train_sequences])
    if not train_sequences or not val_sequences or set(train_sequences) & set(val_sequences):
        raise SegmentationInputError(f"DAVIS split needs disjoint, non-empty train and val sequences, got "
                                     f"train {train_sequences} and val {val_sequences}")
    return davis_pairs(root, train_sequences), davis_pairs(root, val_sequences), "davis"


def read_pair(pair: Pair, size: tuple[int, int], binary: bool) -> tuple[torch.Tensor, np.ndarray]:
    """The image resized to ``size`` (H, W), ImageNet-normalised, and its mask at its own size
    (class indices; ``binary``: every object index is 1, void stays 255)."""
    from PIL import Image
    from ssl_xcit.data.common import IMAGENET_MEAN, IMAGENET_STD
    with Image.open(pair.image) as im:
        rgb = im.convert("RGB")
        hw = (rgb.height, rgb.width)
        rgb = rgb.resize((size[1], size[0]), Image.BICUBIC)
    with Image.open(pair.mask) as m:
        mask = np.array(m if m.mode in ("P", "L") else m.convert("L"), dtype=np.uint8)
    if mask.shape != hw:
        raise SegmentationInputError(f"{pair.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                                     f"{pair.image.name} is {hw[1]}x{hw[0]}")
    if binary:
        mask = np.where(mask == IGNORE, IGNORE, (mask > 0).astype(np.uint8)).astype(np.uint8)
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std, mask


def input_size(height: int, width: int, size: Sequence[int], patch: int) -> tuple[int, int, str | None]:
    """(H, W) the images are resized to: ``size`` = (short side,) with the long side in proportion,
    or (H, W); each side rounded down to the patch (a note says so when it had to be)."""
    if len(size) == 1:
        s = int(size[0])
        th, tw = (round(s * height / width), s) if height > width else (s, round(s * width / height))
    else:
        th, tw = int(size[0]), int(size[1])
    nh, nw = max(patch, th // patch * patch), max(patch, tw // patch * patch)
    note = None if (nh, nw) == (th, tw) else f"input size {tw}x{th} rounded to {nw}x{nh} (patch {patch})"
    return nh, nw, note


# ----------------------------------------------------------------------------- features
class PatchMaps(nn.Module):
    """The probe's input map (B, n*C, H/p, W/p): the final normed patch tokens (n=1), or the last n
    XCA blocks, each through the model's final norm, concatenated (DINOv2's normed intermediate layers)."""

    def __init__(self, model: nn.Module, n_blocks: int = 1) -> None:
        super().__init__()
        from ssl_xcit.models.dense import DenseFeatures
        depth = len(model.blocks)
        if not 1 <= n_blocks <= depth:
            raise SegmentationInputError(f"n_blocks={n_blocks}: this model has {depth} XCA blocks, give 1..{depth}")
        self.n_blocks = n_blocks
        self.norm = model.norm
        self.dense = DenseFeatures(model, ("final",) if n_blocks == 1 else tuple(range(depth - n_blocks, depth)))

    @property
    def patch_size(self) -> int:
        return self.dense.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.dense(x)
        if self.n_blocks > 1:
            maps = [self.norm(m.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for m in maps]
        return torch.cat(maps, dim=1)


@torch.no_grad()
def extract_split(maps: PatchMaps, pairs: Sequence[Pair], size: tuple[int, int], binary: bool,
                  device: torch.device | str, batch_size: int = 8, progress: bool = True, desc: str = "features"
                  ) -> dict:
    """Cached form of a split: ``feats`` (N, D, h, w) float16, ``targets`` (N, H, W) uint8 (masks
    resized, nearest, to the input size: what the head trains on), ``masks`` (the masks at their
    own size: what is scored)."""
    from tqdm import tqdm
    feats, targets, masks = [], [], []
    for start in tqdm(range(0, len(pairs), batch_size), desc=desc, disable=not progress, unit="batch"):
        xs, ms = zip(*(read_pair(p, size, binary) for p in pairs[start:start + batch_size]))
        feats.append(maps(torch.stack(xs).to(device)).float().cpu().half())
        for m in ms:
            masks.append(torch.from_numpy(m))
            targets.append(F.interpolate(torch.from_numpy(m)[None, None].float(), size=size, mode="nearest")[0, 0]
                           .to(torch.uint8))
    return {"feats": torch.cat(feats), "targets": torch.stack(targets), "masks": masks}


# ----------------------------------------------------------------------------- head and scores
def linear_head(dim: int, num_classes: int) -> nn.Module:
    """DINOv2's linear decoder: BatchNorm then a 1x1 convolution."""
    return nn.Sequential(nn.BatchNorm2d(dim), nn.Conv2d(dim, num_classes, kernel_size=1))


def balanced_weights(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class loss weights 1 / (K * f_k), f_k the class's pixel share of the train targets (255 left
    out) and K the number of classes that occur; 0 for a class that never occurs. Each present class
    then carries the same share of the loss, as in mIoU, where each class counts the same whatever its
    area: a fg/bg split with a small foreground otherwise lets an "all background" head score well
    on the loss and near 0 on the foreground IoU."""
    counts = torch.bincount(targets[targets != IGNORE].long().flatten(), minlength=num_classes)[:num_classes]
    counts = counts.double()
    present = counts > 0
    weights = torch.zeros(num_classes, dtype=torch.float64)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.float()


def train_head(feats: torch.Tensor, targets: torch.Tensor, num_classes: int, steps: int = 1000,
               batch_size: int = 16, lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0,
               progress: bool = True, class_weights: torch.Tensor | None = None) -> nn.Module:
    """The head trained on cached features: AdamW, lr decayed linearly to 0 (poly, power 1), logits
    upsampled bilinearly to the target size, cross-entropy ignoring 255 (weighted per class by
    ``class_weights`` when given: see ``balanced_weights``)."""
    from tqdm import tqdm
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = linear_head(feats.shape[1], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / steps)
    head.train()
    for _ in tqdm(range(steps), desc="head", disable=not progress, unit="step"):
        idx = torch.randint(0, feats.shape[0], (min(batch_size, feats.shape[0]),), generator=g)
        logits = head(feats[idx].float())
        up = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(up, targets[idx].long(), weight=class_weights, ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return head.eval()


def iou_counts(pred: np.ndarray, mask: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class: |pred = k and mask = k| and |pred = k or mask = k|, pixels where mask is 255 left out."""
    keep = mask != IGNORE
    p, m = pred[keep].astype(np.int64), mask[keep].astype(np.int64)
    inter = np.bincount(m[p == m], minlength=num_classes)[:num_classes]
    area_p = np.bincount(p, minlength=num_classes)[:num_classes]
    area_m = np.bincount(m, minlength=num_classes)[:num_classes]
    return inter, area_p + area_m - inter


def mean_iou(inter: np.ndarray, union: np.ndarray) -> tuple[float, list[float | None]]:
    """(mIoU over the classes that occur, per-class IoU with None for a class that never occurs)."""
    per = [None if u == 0 else float(i / u) for i, u in zip(inter, union)]
    seen = [v for v in per if v is not None]
    return (float(np.mean(seen)) if seen else float("nan")), per


@torch.no_grad()
def score_head(head: nn.Module, feats: torch.Tensor, masks: Sequence[torch.Tensor], num_classes: int) -> dict:
    """mIoU over a split (intersections and unions summed over its images, at each mask's own size)
    and each image's own mIoU (the unit of a paired comparison)."""
    inter = np.zeros(num_classes, np.int64)
    union = np.zeros(num_classes, np.int64)
    per_image = []
    for i, mask in enumerate(masks):
        logits = head(feats[i:i + 1].float())
        pred = F.interpolate(logits, size=tuple(mask.shape), mode="bilinear", align_corners=False)[0].argmax(0)
        a, b = iou_counts(pred.numpy(), mask.numpy(), num_classes)
        inter += a
        union += b
        per_image.append(mean_iou(a, b)[0])
    miou, per_class = mean_iou(inter, union)
    return {"mIoU": miou, "per_class_IoU": per_class, "per_image_mIoU": per_image}


# ----------------------------------------------------------------------------- the evaluation
RESULT_FILE = "segmentation.json"
CLASS_WEIGHTS = ("none", "balanced")


@dataclass
class ProbeSettings:
    n_blocks: int = 1
    image_size: tuple[int, ...] = (224,)
    num_classes: int | None = None     # None: the largest mask index of the train split + 1 (DAVIS: 2, fg/bg)
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    class_weights: str = "none"        # "none": DINOv2's plain cross-entropy; "balanced": see balanced_weights


def _cached_split(maps: PatchMaps, pairs: list[Pair], size: tuple[int, int], binary: bool, path: Path,
                  fingerprint: dict, device, progress: bool, desc: str) -> dict:
    """A split's features from ``path`` when written for the same weights, settings and images; else
    computed and written (atomically)."""
    from ssl_xcit.atomic import atomic_torch_save
    key = {**fingerprint, "images": [str(p.image) for p in pairs], "size": list(size)}
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        if cached.get("key") == key:
            log.info("%s: features from %s", desc, path)
            return cached
    data = extract_split(maps, pairs, size, binary, device, progress=progress, desc=desc)
    data["key"] = key
    atomic_torch_save(data, path)
    return data


def _num_classes(settings: ProbeSettings, kind: str, train: dict, val: dict) -> int:
    top = max(int(t[t != IGNORE].max()) if (t != IGNORE).any() else 0 for t in train["masks"] + val["masks"])
    n = settings.num_classes or (2 if kind == "davis" else top + 1)
    if top >= n:
        raise SegmentationInputError(f"a mask holds class index {top} but num_classes={n}: give "
                                     f"num_classes={top + 1} or more (255 is 'ignore')")
    return n


def _check_class_weights(settings: ProbeSettings) -> None:
    if settings.class_weights not in CLASS_WEIGHTS:
        raise SegmentationInputError(f"class_weights={settings.class_weights!r}: give one of "
                                     f"{', '.join(CLASS_WEIGHTS)}")


def _loss_weights(settings: ProbeSettings, targets: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    return balanced_weights(targets, num_classes) if settings.class_weights == "balanced" else None


def evaluate_segmentation_probe(model: nn.Module, data_path: str | Path, output_dir: str | Path,
                                settings: ProbeSettings | None = None, train_sequences: Sequence[str] | None = None,
                                val_sequences: Sequence[str] | None = None, device: torch.device | str = "cpu",
                                progress: bool = True, source: dict | None = None) -> dict:
    """Train the linear head on the train split's cached features, score mIoU on val; writes
    ``output_dir/segmentation.json`` (atomic) and the feature caches ``output_dir/features_*.pt``."""
    import time
    from dataclasses import asdict

    from ssl_xcit.atomic import atomic_write_json
    from ssl_xcit.evaluate.export import weights_sha256
    settings = settings or ProbeSettings()
    _check_class_weights(settings)
    train_pairs, val_pairs, kind = split_pairs(data_path, train_sequences, val_sequences)
    t0 = time.perf_counter()
    maps = PatchMaps(model, settings.n_blocks).eval().to(device)
    from ssl_xcit.evaluate.video_segmentation import image_size
    h, w, note = input_size(*image_size(train_pairs[0].image), settings.image_size, maps.patch_size)
    if note:
        log.warning("%s", note)
    out = Path(output_dir)
    fp = {"weights_sha256": weights_sha256(model), "n_blocks": settings.n_blocks, "binary": kind == "davis"}
    train = _cached_split(maps, train_pairs, (h, w), kind == "davis", out / "features_train.pt", fp, device,
                          progress, "train features")
    val = _cached_split(maps, val_pairs, (h, w), kind == "davis", out / "features_val.pt", fp, device,
                        progress, "val features")
    t_feat = time.perf_counter() - t0
    n_classes = _num_classes(settings, kind, train, val)
    weights = _loss_weights(settings, train["targets"], n_classes)
    head = train_head(train["feats"], train["targets"], n_classes, settings.steps, settings.batch_size,
                      settings.lr, settings.weight_decay, settings.seed, progress, weights)
    scores = score_head(head, val["feats"], val["masks"], n_classes)
    scores["per_image_mIoU"] = [None if math.isnan(v) else v for v in scores["per_image_mIoU"]]
    result = {**scores, "num_classes": n_classes, "data": kind,
              "loss_weights": None if weights is None else weights.tolist(), "input_size": [h, w],
              "notes": [note] if note else [],
              "train_images": len(train_pairs), "val_images": [str(p.image) for p in val_pairs],
              "train_groups": sorted({p.group for p in train_pairs} - {""}),
              "val_groups": sorted({p.group for p in val_pairs} - {""}),
              "settings": {**asdict(settings), "image_size": list(settings.image_size)}, "source": source or {},
              "seconds": {"features": t_feat, "total": time.perf_counter() - t0}, "device": str(device)}
    atomic_write_json(out / RESULT_FILE, result, indent=1)
    return result

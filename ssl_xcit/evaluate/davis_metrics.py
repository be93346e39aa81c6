"""DAVIS's video-segmentation scores, computed as the davis2017-evaluation package computes them.

* J, region similarity: the IoU of a predicted object mask and its ground truth, void pixels (255)
  left out; 1 when both are empty.
* F, boundary accuracy: the F-measure of boundary pixels. Each mask's boundary (``seg2bmap``: a pixel
  differing from its right, lower or lower-right neighbour) is dilated by a disk of radius
  ``ceil(bound_th * image diagonal)`` (bound_th 0.008: 8 px at 854x480); precision is the share of
  predicted boundary pixels inside the dilated true boundary, recall the converse.
* Per sequence the first and the last frames are left out (the first is given; davis2017-evaluation
  drops the last too); each object's mean over the remaining frames is its J (F); J-Mean (F-Mean)
  is the mean over every object of every sequence, and J&F-Mean their average.

Why our own code: the package needs OpenCV and scikit-image, which this project does not carry;
the functions here are short and tested against cases computed by hand.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

VOID = 255
BOUND_TH = 0.008


def region_j(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None) -> float:
    """IoU of two boolean masks outside ``void``; 1.0 when the union is empty (both masks empty)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    keep = np.ones_like(gt) if void is None else ~np.asarray(void, bool)
    inter = np.count_nonzero(pred & gt & keep)
    union = np.count_nonzero((pred | gt) & keep)
    return 1.0 if union == 0 else inter / union


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """DAVIS's boundary map: pixels that differ from their east, south or south-east neighbour
    (the last row compares east only, the last column south only, the corner pixel is 0)."""
    seg = np.asarray(seg, bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def dilate_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by the disk ``x^2 + y^2 <= radius^2`` (scikit-image's ``disk``), pixels
    outside the image counting as unset (OpenCV's default border for dilation).

    Done as a union over the disk's rows of horizontal-segment dilations (a running sum per row),
    so the cost is O(radius * pixels) rather than O(radius^2 * pixels)."""
    mask = np.asarray(mask, bool)
    if radius <= 0:
        return mask.copy()
    h, w = mask.shape
    csum = np.zeros((h, w + 1), np.int32)
    np.cumsum(mask, axis=1, out=csum[:, 1:])
    segment: dict[int, np.ndarray] = {}
    out = np.zeros_like(mask)
    for dy in range(-radius, radius + 1):
        half = math.isqrt(radius * radius - dy * dy)
        if half not in segment:
            lo = np.clip(np.arange(w) - half, 0, w)
            hi = np.clip(np.arange(w) + half + 1, 0, w)
            segment[half] = (csum[:, hi] - csum[:, lo]) > 0
        seg = segment[half]
        # out[y] |= seg[y + dy]
        if dy >= 0:
            out[: h - dy] |= seg[dy:]
        else:
            out[-dy:] |= seg[: h + dy]
    return out


def boundary_f(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None,
               bound_th: float = BOUND_TH) -> float:
    """DAVIS's boundary F-measure of two boolean masks (davis2017-evaluation's ``f_measure``)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if void is not None:
        keep = ~np.asarray(void, bool)
        pred, gt = pred & keep, gt & keep
    radius = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*pred.shape)))
    fg_b, gt_b = seg2bmap(pred), seg2bmap(gt)
    n_fg, n_gt = np.count_nonzero(fg_b), np.count_nonzero(gt_b)
    if n_fg == 0 or n_gt == 0:
        precision, recall = (1.0 if n_fg == 0 else 0.0), (1.0 if n_gt == 0 else 0.0)
    else:
        precision = np.count_nonzero(fg_b & dilate_disk(gt_b, radius)) / n_fg
        recall = np.count_nonzero(gt_b & dilate_disk(fg_b, radius)) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def score_frames(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], n_objects: int | None = None,
                 bound_th: float = BOUND_TH) -> dict[str, np.ndarray]:
    """J and F per object and frame of one sequence: ``{"J": (K, T-2), "F": (K, T-2)}``.

    ``preds``/``gts``: label maps (0 background, k object k, 255 void in the ground truth), one per
    frame, the first given frame included; the first and last frames are left out, as
    davis2017-evaluation does. Objects are 1..K with K the largest label of the first ground truth
    (``n_objects`` overrides it)."""
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predicted frames but {len(gts)} ground-truth frames")
    if len(gts) < 3:
        raise ValueError(f"a sequence needs at least 3 frames to be scored (first and last are left out), "
                         f"got {len(gts)}")
    first = np.asarray(gts[0])
    k = int(first[first != VOID].max(initial=0)) if n_objects is None else n_objects
    j = np.zeros((k, len(gts) - 2))
    f = np.zeros((k, len(gts) - 2))
    for t in range(1, len(gts) - 1):
        gt, pred = np.asarray(gts[t]), np.asarray(preds[t])
        if gt.shape != pred.shape:
            raise ValueError(f"frame {t}: prediction {pred.shape} and ground truth {gt.shape} differ in size")
        void = gt == VOID
        for obj in range(1, k + 1):
            j[obj - 1, t - 1] = region_j(pred == obj, gt == obj, void)
            f[obj - 1, t - 1] = boundary_f(pred == obj, gt == obj, void, bound_th)
    return {"J": j, "F": f}


def summarize(per_sequence: dict[str, dict[str, np.ndarray]]) -> dict:
    """davis2017-evaluation's global table from :func:`score_frames` of each sequence: per sequence
    J and F (means over its objects' frame means), and J-Mean, F-Mean, J&F-Mean over all objects,
    with the recalls (share of frames above 0.5)."""
    obj_j, obj_f, rec_j, rec_f, sequences = [], [], [], [], {}
    for name, s in per_sequence.items():
        jm, fm = s["J"].mean(axis=1), s["F"].mean(axis=1)
        obj_j += jm.tolist()
        obj_f += fm.tolist()
        rec_j += (s["J"] > 0.5).mean(axis=1).tolist()
        rec_f += (s["F"] > 0.5).mean(axis=1).tolist()
        sequences[name] = {"J": float(jm.mean()), "F": float(fm.mean()),
                           "J&F": float((jm.mean() + fm.mean()) / 2), "objects": int(len(jm)),
                           "frames_scored": int(s["J"].shape[1])}
    if not obj_j:
        raise ValueError("no sequence to summarize")
    j_mean, f_mean = float(np.mean(obj_j)), float(np.mean(obj_f))
    return {"J&F-Mean": (j_mean + f_mean) / 2, "J-Mean": j_mean, "J-Recall": float(np.mean(rec_j)),
            "F-Mean": f_mean, "F-Recall": float(np.mean(rec_f)), "sequences": sequences}


def per_frame_jf(per_sequence: dict[str, dict[str, np.ndarray]]) -> np.ndarray:
    """(J + F) / 2 of every scored frame of every sequence, averaged over the frame's objects, in
    sequence order: the paired unit when two models are compared on the same frames."""
    return np.concatenate([((s["J"] + s["F"]) / 2).mean(axis=0) for s in per_sequence.values()])


__all__ = ["region_j", "seg2bmap", "dilate_disk", "boundary_f", "score_frames", "summarize", "per_frame_jf",
           "BOUND_TH", "VOID"]

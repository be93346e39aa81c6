"""DINO's image-retrieval protocol on revisited Oxford and Paris (``eval_image_retrieval.py``).

Data: the revisitop layout, ``DATA/<dataset>/gnd_<dataset>.pkl`` and ``DATA/<dataset>/jpg/<name>.jpg``
(``dataset`` is ``roxford5k`` or ``rparis6k``). The pickle holds ``imlist`` (database names),
``qimlist`` (query names) and ``gnd``: per query the ``easy``, ``hard`` and ``junk`` database images
(and a ``bbx`` that DINO does not use: queries are whole images there, and here).

Features, as DINO: each image shrunk (never enlarged) so that its longer side is at most ``imsize``
(``PIL.Image.thumbnail``), normalised, one image at a time; the CLS feature, or with ``multiscale``
the mean of the CLS features at scales 1, 1/sqrt(2), 1/2 (bilinear), L2-normalised. Rows and columns
that do not fill a whole patch are dropped (a ViT's strided patch embedding ignores them too).

Scores: revisitop's ``compute_map`` (:func:`compute_map`, a re-implementation of the same
definition): a query's positives are ranked by similarity; junk images are removed from the ranking
before positions are counted (a positive behind k junk images moves up by k); AP is the trapezoid
rule of :func:`ssl_xcit.evaluate.copy_detection.average_precision`; a query without positives is left
out of the mean. Medium: positives easy + hard, junk junk. Hard: positives hard, junk junk + easy.
"""
from __future__ import annotations

import logging
import math
import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ssl_xcit.errors import UserError, hinted
from ssl_xcit.evaluate.copy_detection import average_precision

logger = logging.getLogger(__name__)

DATASETS = ("roxford5k", "rparis6k")
SCALES = (1.0, 1 / math.sqrt(2), 0.5)
KAPPAS = (1, 5, 10)


class RetrievalError(UserError, ValueError):
    """A dataset folder that is not in the revisitop layout, or a bad setting."""


class _GroundTruthUnpickler(pickle.Unpickler):
    """Unpickles a ground-truth file's lists, dicts and numpy arrays and nothing else: a pickle can
    run any code it names, and a data set downloaded from the web should not."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("builtins", "set"), ("builtins", "frozenset")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise RetrievalError(f"the ground-truth file refers to {module}.{name}: only lists, dicts and numpy "
                             "arrays are read from it")


def load_revisitop(data_path: str | os.PathLike, dataset: str) -> dict:
    """The ground truth of ``dataset`` under ``data_path``, with ``dir_images`` (its ``jpg/``)."""
    if dataset not in DATASETS:
        raise RetrievalError(f"unknown dataset {dataset!r}; choose {' or '.join(DATASETS)}")
    folder = Path(data_path).expanduser() / dataset
    gnd_file = folder / f"gnd_{dataset}.pkl"
    if not gnd_file.is_file():
        raise hinted(RetrievalError, f"{gnd_file} not found: the data folder must hold {dataset}/gnd_{dataset}.pkl "
                     f"and {dataset}/jpg/ (revisitop's layout)", "download both with revisitop's python/download.py",
                     needs="data_path")
    try:
        with open(gnd_file, "rb") as f:
            cfg = _GroundTruthUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise RetrievalError(f"{gnd_file} is not a revisitop ground-truth pickle ({err})") from None
    missing = [k for k in ("imlist", "qimlist", "gnd") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise RetrievalError(f"{gnd_file} has no {', '.join(missing)}: not a revisitop ground-truth file")
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise RetrievalError(f"{gnd_file}: {len(cfg['gnd'])} ground-truth entries for {len(cfg['qimlist'])} queries")
    cfg["dir_images"] = str(folder / "jpg")
    if not (folder / "jpg").is_dir():
        raise RetrievalError(f"{folder} has no jpg/ folder of images (revisitop's layout)")
    return cfg


# --------------------------------------------------------------------------------------------- scoring
def compute_map(ranks: np.ndarray, gnd: Sequence[dict], kappas: Sequence[int] = ()):
    """revisitop's ``compute_map``: ``(mAP, APs, mean precision@kappas, precisions@kappas)``.

    ``ranks``: (database size, queries), column ``i`` the database indices in the order query ``i``
    ranks them. ``gnd[i]``: ``ok`` (positives) and optionally ``junk`` (ignored) database indices.
    """
    nq = len(gnd)
    aps, prs = np.zeros(nq), np.zeros((nq, len(kappas)))
    for i in range(nq):
        ok = np.asarray(gnd[i]["ok"])
        if ok.size == 0:
            aps[i], prs[i] = np.nan, np.nan
            continue
        junk = np.asarray(gnd[i].get("junk", []))
        column = ranks[:, i]
        pos = np.flatnonzero(np.isin(column, ok))
        junk_pos = np.flatnonzero(np.isin(column, junk))
        pos = pos - np.searchsorted(junk_pos, pos)            # junk ranked before a positive does not count
        aps[i] = average_precision(pos.tolist(), len(ok))
        one_based = pos + 1
        for j, k in enumerate(kappas):
            kq = min(int(one_based.max()), k) if one_based.size else k
            prs[i, j] = (one_based <= kq).sum() / kq
    valid = ~np.isnan(aps)
    if not valid.any():
        raise RetrievalError("no query has a positive image: nothing to score")
    return float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs


def medium_hard(gnd: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """The Medium and Hard protocols' ``ok`` / ``junk`` lists from revisitop's easy / hard / junk."""
    cat = lambda *parts: np.concatenate([np.asarray(p, dtype=np.int64).reshape(-1) for p in parts])  # noqa: E731
    medium = [{"ok": cat(g["easy"], g["hard"]), "junk": cat(g["junk"])} for g in gnd]
    hard = [{"ok": cat(g["hard"]), "junk": cat(g["junk"], g["easy"])} for g in gnd]
    return medium, hard


def score_rankings(ranks: np.ndarray, gnd: Sequence[dict], kappas: Sequence[int] = KAPPAS) -> dict:
    """mAP and mP@k, Medium and Hard, in percent, as DINO prints them."""
    medium, hard = medium_hard(gnd)
    map_m, _, mpr_m, _ = compute_map(ranks, medium, kappas)
    map_h, _, mpr_h, _ = compute_map(ranks, hard, kappas)
    return {"mAP_M": 100 * map_m, "mAP_H": 100 * map_h,
            **{f"mP@{k}_M": 100 * float(v) for k, v in zip(kappas, mpr_m)},
            **{f"mP@{k}_H": 100 * float(v) for k, v in zip(kappas, mpr_h)}}


# --------------------------------------------------------------------------------------------- features
def load_image(path: str, imsize: int | None) -> torch.Tensor:
    """DINO's retrieval input: shrunk to fit ``imsize`` (aspect kept, never enlarged), normalised."""
    from PIL import Image
    from torchvision import transforms as T

    from ssl_xcit.data.common import IMAGENET_MEAN, IMAGENET_STD, load_rgb
    img = load_rgb(path)
    if imsize is not None:
        img.thumbnail((imsize, imsize), Image.LANCZOS)
    return T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(img))


def _fit_patch(x: torch.Tensor, patch: int) -> torch.Tensor:
    """The image without the last rows / columns that do not fill a patch: what a ViT's strided
    patch embedding ignores anyway (this project's XCiT asks for whole patches instead)."""
    h, w = x.shape[-2:]
    return x[..., :max(patch, h // patch * patch), :max(patch, w // patch * patch)]


@torch.no_grad()
def image_feature(model, image: torch.Tensor, multiscale: bool = False) -> torch.Tensor:
    """The L2-normalised CLS feature of one image (1, 3, H, W); ``multiscale``: DINO's mean over
    ``SCALES``."""
    from ssl_xcit.evaluate.backbone import backbone_outputs
    patch = int(getattr(model, "patch_size", 1) or 1)
    total = 0
    for s in (SCALES if multiscale else (1.0,)):
        x = image if s == 1 else torch.nn.functional.interpolate(image, scale_factor=s, mode="bilinear",
                                                                  align_corners=False)
        total = total + backbone_outputs(model, _fit_patch(x, patch), ("cls",))["cls"].float()
    return torch.nn.functional.normalize(total, dim=1)


def extract(model, names: Sequence[str], cfg: dict, imsize: int | None, multiscale: bool,
            device: str | torch.device = "cpu", progress: bool = True, desc: str = "images") -> torch.Tensor:
    """Features of ``names`` (revisitop names, ``.jpg`` added) in order; an unreadable image is an error
    (the ground truth refers to every image by its position)."""
    from tqdm import tqdm

    from ssl_xcit.data.common import DECODE_ERRORS
    rows = []
    for name in tqdm(names, desc=desc, unit="img", disable=not progress):
        path = os.path.join(cfg["dir_images"], name + ".jpg")
        try:
            image = load_image(path, imsize)
        except DECODE_ERRORS as err:
            raise RetrievalError(f"cannot read {path} ({type(err).__name__}: {err}): the ground truth needs "
                                 "every image of the data set") from None
        rows.append(image_feature(model, image[None].to(device), multiscale).cpu())
    return torch.cat(rows)


def evaluate_retrieval(model, data_path: str | os.PathLike, dataset: str, imsize: int | None = 224,
                       multiscale: bool = False, device: str | torch.device = "cpu", progress: bool = True) -> dict:
    """DINO's ``eval_image_retrieval.py`` on ``data_path/dataset``: mAP Medium / Hard (percent)."""
    cfg = load_revisitop(data_path, dataset)
    db = extract(model, cfg["imlist"], cfg, imsize, multiscale, device, progress, "database")
    q = extract(model, cfg["qimlist"], cfg, imsize, multiscale, device, progress, "queries")
    ranks = torch.argsort(-(db @ q.T), dim=0, stable=True).numpy()
    return {"dataset": dataset, "imsize": imsize, "multiscale": multiscale, "database": len(db), "queries": len(q),
            **score_rankings(ranks, cfg["gnd"])}

"""Weighted k-NN classification of frozen features, DINO's protocol, searched with faiss.

Protocol (Caron et al. 2021, ``eval_knn.py``): train and val CLS features of the teacher, images
resized to 256 (bicubic) and centre-cropped to 224, L2-normalised; for each val image the k most
cosine-similar train images vote for their class with weight ``exp(sim / T)``; the class scores
give top-1 and top-5 (top-min(5, k)). Defaults are DINO's: k in 10 20 100 200, T = 0.07.

The search (:mod:`ssl_xcit.evaluate.knn_index`): ``index='auto'`` (default) is exact faiss
``IndexFlatIP`` below 100,000 train features and ``cells`` (an inverted file searched cell by cell,
its nprobe calibrated against exact search on a sample of the queries) from there on;
``flat|cells|ivf|hnsw`` force one. Class-score ties are broken towards the lower class index, so
results do not depend on the sort implementation.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ssl_xcit.evaluate import backbone, datasets, runtime
from ssl_xcit.evaluate.knn_index import (AUTO_MIN_TRAIN, CellIndex, FeatureIndex,  # noqa: F401 (re-exported)
                                         IndexConfig, build_index, faiss_gpu_available)
from ssl_xcit.errors import SETTING, hinted, named
from ssl_xcit.evaluate.inputs import DEFAULT_KS, DEFAULT_TEMPERATURE, EvalInputError, SourceSettings, check_positive
from ssl_xcit.atomic import atomic_torch_save, atomic_write_json

logger = logging.getLogger(__name__)
# DINO's --dump_features file names, so dumps from either tool load in the other
DUMP_FILES = {"train_features": "trainfeat.pth", "train_labels": "trainlabels.pth",
              "val_features": "testfeat.pth", "val_labels": "testlabels.pth"}
DUMP_META = "features.json"


class MissingDumpError(EvalInputError, FileNotFoundError):
    """Dumped features to load are not there (a ``FileNotFoundError`` too, as before)."""


@dataclass
class KnnSettings(SourceSettings):
    """A k-NN evaluation as :func:`evaluate_knn` runs it (the backbone and images: ``SourceSettings``);
    ``load_features`` (a folder ``dump_features`` wrote) replaces the backbone and the images."""

    nb_knn: list[int] = field(default_factory=lambda: list(DEFAULT_KS))   # numbers of neighbours
    temperature: float = DEFAULT_TEMPERATURE
    index: str = "auto"                  # auto, flat, cells, ivf, hnsw (ssl_xcit.evaluate.knn_index)
    nlist: int | None = None
    nprobe: int | None = None
    hnsw_m: int = 32
    ef_search: int = 256
    fp16_features: bool = False          # features (and the index) in float16
    query_batch: int = 1000
    dump_features: str | None = None     # save the extracted features to this folder
    load_features: str | None = None     # read them from there; no extraction
    use_cuda: bool | None = None         # DINO's: False keeps features and search on the CPU


# --------------------------------------------------------------------------------------------- votes
def weighted_votes(sims: np.ndarray | torch.Tensor, neighbor_labels: np.ndarray | torch.Tensor, num_classes: int,
                   temperature: float, valid: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
    """Class scores (Q, C) in float64: each neighbour adds ``exp(sim / T)`` to its class."""
    check_positive(temperature, "temperature")
    s = torch.as_tensor(sims, dtype=torch.float64)
    lab = torch.as_tensor(neighbor_labels, dtype=torch.long)
    w = torch.exp(s / temperature)
    if valid is not None:
        w = w * torch.as_tensor(valid, dtype=torch.float64)
        lab = torch.where(torch.as_tensor(valid), lab, torch.zeros_like(lab))
    if lab.numel() and (lab.min() < 0 or lab.max() >= num_classes):
        raise ValueError(f"neighbour labels must lie in [0, {num_classes}), "
                         f"got [{int(lab.min())}, {int(lab.max())}]")
    scores = torch.zeros(s.shape[0], num_classes, dtype=torch.float64)
    return scores.scatter_add_(1, lab, w)


def ranked_classes(scores: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` best classes per row, best first; equal scores in class-index order."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :n]


@dataclass(frozen=True)
class KnnPrediction:
    k: int
    top5: torch.Tensor  # (Q, min(5, k)) predicted classes, best first
    top1_acc: float  # percent
    top5_acc: float  # percent
    n_train: int = 0  # train features in the memory the neighbours came from (what a report should say)


def knn_predict(index: FeatureIndex, train_labels: torch.Tensor, val_features: torch.Tensor,
                val_labels: torch.Tensor, ks: Sequence[int] = DEFAULT_KS,
                temperature: float = DEFAULT_TEMPERATURE, num_classes: int | None = None,
                query_batch: int = 1000) -> dict[int, KnnPrediction]:
    """One search with the largest k; each smaller k uses the first k (sorted) neighbours."""
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] <= 0:   # the tools check their own k options first, in their words
        raise EvalInputError(f"k (neighbours) must be positive, got {ks}")
    if ks[-1] > index.ntotal:
        raise EvalInputError(f"k={ks[-1]} neighbours exceeds the {index.ntotal} train features")
    train_labels = torch.as_tensor(train_labels, dtype=torch.long).cpu()
    val_labels = torch.as_tensor(val_labels, dtype=torch.long).cpu()
    if len(val_features) != len(val_labels):
        raise ValueError(f"{len(val_features)} val features but {len(val_labels)} val labels")
    if len(train_labels) != index.ntotal:
        raise ValueError(f"{index.ntotal} indexed train features but {len(train_labels)} train labels")
    for name, lab in (("train", train_labels), ("val", val_labels)):
        if lab.numel() and lab.min() < 0:
            raise EvalInputError(f"{name} labels contain {int(lab.min())}: k-NN needs class labels")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    sims, ids = index.search(val_features, ks[-1], query_batch)
    ids_t = torch.from_numpy(ids)
    valid = ids_t >= 0
    neigh = train_labels[ids_t.clamp(min=0)]
    out = {}
    for k in ks:
        scores = weighted_votes(sims[:, :k], neigh[:, :k], num_classes, temperature, valid[:, :k])
        top = ranked_classes(scores, min(5, k, num_classes))
        hit = top == val_labels[:, None]
        n = max(len(val_labels), 1)
        out[k] = KnnPrediction(k=k, top5=top, top1_acc=100.0 * hit[:, 0].sum().item() / n,
                               top5_acc=100.0 * hit.any(dim=1).sum().item() / n, n_train=index.ntotal)
    return out


def l2_normalize(x: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Row-wise L2 normalisation in float32 chunks, result in ``x``'s dtype."""
    out = torch.empty_like(x)
    for s in range(0, len(x), chunk):
        out[s:s + chunk] = torch.nn.functional.normalize(x[s:s + chunk].float(), dim=1, p=2).to(x.dtype)
    return out


def knn_classifier(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                   val_labels: torch.Tensor, ks: Sequence[int] = DEFAULT_KS,
                   temperature: float = DEFAULT_TEMPERATURE, num_classes: int | None = None,
                   index_cfg: IndexConfig = IndexConfig(), query_batch: int = 1000,
                   normalize: bool = True, used: dict | None = None) -> dict[int, dict[str, float]]:
    """DINO's weighted k-NN: ``{k: {"top1": %, "top5": %}}``. ``used``, when given, receives the
    index kind that searched (``auto``: flat or cells, and why)."""
    if normalize:
        train_features, val_features = l2_normalize(train_features), l2_normalize(val_features)
    index = build_index(train_features, index_cfg)
    preds = knn_predict(index, train_labels, val_features, val_labels, ks, temperature, num_classes, query_batch)
    if used is not None:
        used["kind"] = getattr(index, "chosen", None) or index_cfg.resolved(len(train_features)).kind
        used["reason"] = getattr(index, "reason", None)
    return {k: {"top1": p.top1_acc, "top5": p.top5_acc} for k, p in preds.items()}


# --------------------------------------------------------------------------------------------- dumps
def dump_features(folder: str | Path, train_features, train_labels, val_features, val_labels,
                  meta: dict) -> None:
    folder = Path(folder)
    tensors = {"train_features": train_features, "train_labels": train_labels,
               "val_features": val_features, "val_labels": val_labels}
    for key, fname in DUMP_FILES.items():
        atomic_torch_save(tensors[key].contiguous(), folder / fname)
    atomic_write_json(folder / DUMP_META, meta, indent=2)
    logger.info("features dumped to %s", folder)


def load_dumped(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    folder = Path(folder)
    if not folder.is_dir():
        raise hinted(MissingDumpError, f"{folder} is not a folder of dumped features",
                     "pass load_features=<a folder written with dump_features>", needs="load_features")
    missing = [f for f in DUMP_FILES.values() if not (folder / f).is_file()]
    if missing:
        raise hinted(MissingDumpError, f"{folder} lacks {', '.join(missing)}",
                     "pass load_features=<a folder written with dump_features>", needs="load_features")
    out = {}
    for key, fname in DUMP_FILES.items():
        try:
            out[key] = torch.load(folder / fname, map_location="cpu", weights_only=True)
        except Exception as err:
            raise EvalInputError(f"cannot read {folder / fname}: {type(err).__name__}: {err}") from err
    meta_file = folder / DUMP_META
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    for split in ("train", "val"):
        f, lab = out[f"{split}_features"], out[f"{split}_labels"]
        if f.dim() != 2 or lab.dim() != 1 or len(f) != len(lab):
            raise EvalInputError(f"{folder}: {split} features {tuple(f.shape)} and labels {tuple(lab.shape)} "
                             "do not match")
    if out["train_features"].shape[1] != out["val_features"].shape[1]:
        raise EvalInputError(f"{folder}: train and val features differ in width")
    return out, meta


# --------------------------------------------------------------------------------------------- the tool
def check_k_fits(ks: Sequence[int], n_train: int, what: str = "images", setting: str = "ks") -> None:
    """Every k at most the number of train samples, checked before any feature is extracted."""
    if max(ks) > n_train:
        raise named(EvalInputError, f"{SETTING} {max(ks)} exceeds the {n_train} train {what}: "
                    f"give {SETTING} values of at most {n_train}", setting)


def _extract(s: KnnSettings, env: runtime.EvalEnv) -> tuple[dict[str, torch.Tensor] | None, dict]:
    from ssl_xcit.evaluate.features import extract_features
    model = backbone.load_frozen_backbone(s.checkpoint, s.arch, s.checkpoint_key, env.device,
                                          seed=s.seed, crop_size=s.crop_size)
    train_ds, val_ds, classes = datasets.open_splits(s)
    check_k_fits(s.nb_knn, len(train_ds), setting="nb_knn")  # before minutes of extraction
    dtype = torch.float16 if s.fp16_features else torch.float32
    feats = {}
    for split, ds in (("train", train_ds), ("val", val_ds)):
        f, lab = extract_features(model, ds, s.batch_size, env.device, s.num_workers, which="cls",
                                  progress=s.progress, desc=f"k-NN {split} features")
        if f is not None:
            feats[f"{split}_features"] = l2_normalize(f.float()).to(dtype)
            feats[f"{split}_labels"] = lab
    # the arch used: named by the caller, by the checkpoint, or inferred from its weights (never null when known)
    meta = {"checkpoint": str(s.checkpoint), "arch": getattr(model, "arch", None) or s.arch,
            "checkpoint_key": s.checkpoint_key, "data_path": str(s.data_path),
            "crop_size": s.crop_size, "resize": datasets.resize_for(s.crop_size, s.resize),
            "classes": classes, "dtype": str(dtype).replace("torch.", ""), "normalized": True}
    return (feats if env.is_main else None), meta


def _features(s: KnnSettings, env: runtime.EvalEnv) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """The train and val features (rank 0; ``None`` elsewhere): loaded, or extracted (and dumped)."""
    if s.load_features:
        if not env.is_main:
            return None, {}
        feats, meta = load_dumped(s.load_features)
        check_k_fits(s.nb_knn, len(feats["train_labels"]), "features", setting="nb_knn")
        if s.fp16_features:
            feats = {k: (v.half() if v.is_floating_point() else v) for k, v in feats.items()}
        return feats, meta
    feats, meta = _extract(s, env)
    if env.is_main and s.dump_features:
        dump_features(s.dump_features, feats["train_features"], feats["train_labels"],
                      feats["val_features"], feats["val_labels"], meta)
    return feats, meta


def evaluate_knn(s: KnnSettings) -> dict:
    """DINO's weighted k-NN of ``s``'s backbone on ``s.data_path``'s train/ and val/ (or on loaded
    features); ``knn.json`` written to ``s.output_dir`` and returned (``{}`` on ranks other than 0)."""
    s = dataclasses.replace(s, batch_size=128 if s.batch_size is None else s.batch_size)   # the caller's stays
    env = runtime.setup_env(s.device, s.seed)
    try:
        feats, meta = _features(s, env)
        if not env.is_main:
            return {}
        # DINO's use_cuda=False: features and search stay on the CPU even on a GPU run
        index_cfg = IndexConfig(kind=s.index, fp16=s.fp16_features, nlist=s.nlist, nprobe=s.nprobe,
                                hnsw_m=s.hnsw_m, ef_search=s.ef_search,
                                use_gpu=env.device.type == "cuda" and s.use_cuda is not False)
        classes = meta.get("classes") or None
        used: dict = {}
        results = knn_classifier(feats["train_features"], feats["train_labels"],
                                 feats["val_features"], feats["val_labels"], s.nb_knn,
                                 s.temperature, len(classes) if classes else None, index_cfg,
                                 s.query_batch, normalize=not meta.get("normalized", False), used=used)
        out_dir = Path(s.output_dir) if s.output_dir else (
            runtime.default_output_dir(s.checkpoint) if s.checkpoint else Path(s.load_features))
        report = {
            "tool": "knn",
            "protocol": "DINO weighted k-NN: L2-normalised CLS features, cosine neighbours, votes exp(sim/T)",
            "checkpoint": meta.get("checkpoint", s.checkpoint), "arch": meta.get("arch", s.arch),
            "checkpoint_key": meta.get("checkpoint_key", s.checkpoint_key),
            "data_path": meta.get("data_path", s.data_path and str(s.data_path)),
            "crop_size": meta.get("crop_size"), "resize": meta.get("resize"),
            "temperature": s.temperature, "index": used["kind"], "index_requested": s.index,
            "index_reason": used.get("reason"), "fp16_features": s.fp16_features,
            "num_train": len(feats["train_labels"]), "num_val": len(feats["val_labels"]),
            "num_classes": len(classes) if classes else int(max(feats["train_labels"].max(),
                                                                feats["val_labels"].max())) + 1,
            "results": {str(k): v for k, v in results.items()},
        }
        out_file = atomic_write_json(out_dir / "knn.json", report, indent=2)
        print(format_table(results, s.temperature, used["kind"]))   # auto -> flat or cells, by size and probes
        print(f"written {out_file}")
        report["output"] = str(out_file)
        return report
    finally:
        runtime.teardown_env(env)


def format_table(results: dict[int, dict[str, float]], temperature: float, index: str) -> str:
    lines = [f"weighted k-NN (T={temperature}, index={index})", f"{'k':>6} {'top-1':>8} {'top-5':>8}"]
    for k in sorted(results):
        lines.append(f"{k:>6} {results[k]['top1']:>8.2f} {results[k]['top5']:>8.2f}")
    return "\n".join(lines)

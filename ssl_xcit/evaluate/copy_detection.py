"""Copy detection measurable on any image folder: a seeded benchmark, DINO's descriptors, mAP / recall@1.

The benchmark (:func:`build_benchmark`) takes ``n_originals`` images of a folder (a seeded sample),
makes one copy of each under every edit family of :mod:`ssl_xcit.evaluate.copy_edits` (original
``i`` under the ``f``-th family gets level ``LEVELS[(i + f) % 3]``, so every family is measured at
every strength on a third of the originals each), and lists ``n_distractors`` images of another folder
as distractors. Copies go to ``OUT/copies/<family>/``; ``OUT/benchmark.json`` lists everything and is
written last, so a benchmark folder is complete or is rebuilt. Rebuilding with the same seed gives the
same bytes.

The protocol is DINO's ``eval_copy_detection.py``: images resized to ``imsize`` x ``imsize``
(320 in DINO), the database is the originals plus the distractors, each copy is a query whose one
positive is its original; descriptors ``cls`` and ``cls_gem`` (:mod:`ssl_xcit.evaluate.descriptors`),
optionally PCA-whitened (learned on a separate folder), L2-normalised, ranked by cosine. Scores:
average precision as Holidays / revisitop compute it (:func:`average_precision`, trapezoids of the
precision-recall curve; DINO's ``score_ap_from_ranks_1``) over the full ranking (DINO stops at the
top 20, which changes a query's AP only when its original ranks below 20, by under 1/42), and
recall@1. Ties are counted against the query (a positive tied with others ranks below them), so a
descriptor that gives everything the same score scores zero, not one.

A ``pixels`` baseline needs no network: the image squashed to 8 x 8 RGB, centred per image.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ssl_xcit.atomic import atomic_write, atomic_write_json
from ssl_xcit.errors import UserError, hinted
from ssl_xcit.evaluate.copy_edits import FAMILIES, LEVELS, apply_edit

logger = logging.getLogger(__name__)

BENCH_FILE = "benchmark.json"
PIXELS = "pixels"
PIXEL_SIDE = 8


class CopyBenchError(UserError, ValueError):
    """A benchmark that cannot be built or scored as asked (too few images, an unreadable folder)."""


@dataclass
class Benchmark:
    folder: Path
    originals: list[str]
    queries: list[dict]           # {"path", "original" (row of originals), "family", "level"}
    distractors: list[str]
    settings: dict = field(default_factory=dict)

    @property
    def database(self) -> list[str]:
        return self.originals + self.distractors


def image_files(folder: str | os.PathLike, role: str) -> list[Path]:
    """Every image below ``folder``, sorted (the order a seed picks from)."""
    from ssl_xcit.data.common import IMAGE_EXTENSIONS
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise CopyBenchError(f"{role} folder {path}: no such folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise CopyBenchError(f"{role} folder {path} holds no image")
    return files


def seeded_sample(files: Sequence[Path], n: int, seed: int, role: str, exclude: set[Path] = frozenset()) -> list[Path]:
    """``n`` of ``files`` (not in ``exclude``) drawn with ``seed``, in their sorted order."""
    pool = [f for f in files if f not in exclude]
    if n > len(pool):
        raise hinted(CopyBenchError, f"{n} {role} asked for, but the folder has {len(pool)} usable image(s)",
                     f"ask for at most {len(pool)}", needs=role)
    pick = np.sort(np.random.default_rng(seed).choice(len(pool), n, replace=False))
    return [pool[i] for i in pick]


def _save_jpeg(path: Path, image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        image.save(tmp, "JPEG", quality=95)
    atomic_write(path, write)


def build_benchmark(data: str | os.PathLike, out: str | os.PathLike, n_originals: int,
                    distractors: str | os.PathLike | None = None, n_distractors: int = 0,
                    families: Sequence[str] = tuple(FAMILIES), seed: int = 0, progress: bool = True) -> Benchmark:
    """Make (or reuse, when ``OUT/benchmark.json`` records the same settings) a copy benchmark."""
    from tqdm import tqdm

    from ssl_xcit.data.common import load_rgb
    out = Path(out)
    settings = {"data": str(Path(data).resolve()), "n_originals": n_originals, "seed": seed,
                "distractors": str(Path(distractors).resolve()) if distractors else None,
                "n_distractors": n_distractors, "families": list(families), "version": 1}
    if (out / BENCH_FILE).is_file():
        saved = json.loads((out / BENCH_FILE).read_text())
        if saved.get("settings") == settings:
            return Benchmark(out, saved["originals"], saved["queries"], saved["distractors"], settings)
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise CopyBenchError(f"unknown edit famil{'y' if len(bad) == 1 else 'ies'} {bad}; choose from "
                             f"{', '.join(FAMILIES)}")
    originals = seeded_sample(image_files(data, "originals"), n_originals, seed, "originals")
    dis: list[Path] = []
    if distractors and n_distractors:
        dis = seeded_sample(image_files(distractors, "distractors"), n_distractors, seed + 1, "distractors",
                            exclude=set(originals))
    queries = []
    for i, orig in enumerate(tqdm(originals, desc="make copies", unit="original", disable=not progress)):
        image = load_rgb(str(orig))
        for f, family in enumerate(families):
            level = LEVELS[(i + f) % len(LEVELS)]
            copy = apply_edit(image, family, level, np.random.default_rng([seed, i, f]))
            path = out / "copies" / family / f"{i:05d}_l{level}.jpg"
            _save_jpeg(path, copy)
            queries.append({"path": str(path), "original": i, "family": family, "level": level})
    bench = Benchmark(out, [str(p) for p in originals], queries, [str(p) for p in dis], settings)
    atomic_write_json(out / BENCH_FILE, {"settings": settings, "originals": bench.originals,
                                         "queries": queries, "distractors": bench.distractors}, indent=1)
    return bench


# --------------------------------------------------------------------------------------------- metrics
def average_precision(ranks: Sequence[int], n_pos: int) -> float:
    """AP from the sorted 0-based ranks of the positives found, ``n_pos`` positives in all: the area
    under the precision-recall curve by trapezoids, as the Holidays / revisitop code computes it."""
    if n_pos <= 0:
        raise ValueError("average precision needs at least one positive")
    ap = 0.0
    for found, rank in enumerate(ranks):
        before = 1.0 if rank == 0 else found / rank      # precision just before this positive
        after = (found + 1) / (rank + 1)                  # and once it is counted
        ap += (before + after) / (2.0 * n_pos)
    return ap


def positive_ranks(queries: np.ndarray, database: np.ndarray, positive: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """0-based rank of each query's positive row among ``database`` by inner product; ties count
    against the query (the positive ranks below every other row with the same score)."""
    ranks = np.empty(len(queries), dtype=np.int64)
    for s in range(0, len(queries), chunk):
        sims = queries[s:s + chunk].astype(np.float32) @ database.astype(np.float32).T
        own = sims[np.arange(len(sims)), positive[s:s + chunk]]
        ranks[s:s + chunk] = (sims >= own[:, None]).sum(axis=1) - 1
    return ranks


def _summary(ranks: np.ndarray) -> dict:
    aps = [average_precision([int(r)], 1) for r in ranks]
    return {"mAP": float(np.mean(aps)), "recall@1": float(np.mean(ranks == 0)), "queries": int(len(ranks))}


def copy_scores(ranks: np.ndarray, queries: Sequence[dict]) -> dict:
    """mAP and recall@1 of all queries, per edit family and per family and level."""
    fam = np.array([q["family"] for q in queries])
    lev = np.array([q["level"] for q in queries])
    out = {"all": _summary(ranks), "by_family": {}, "by_level": {}}
    for f in dict.fromkeys(fam.tolist()):
        out["by_family"][f] = _summary(ranks[fam == f])
        for lv in sorted(set(lev[fam == f].tolist())):
            out["by_level"][f"{f}/{lv}"] = _summary(ranks[(fam == f) & (lev == lv)])
    return out


# --------------------------------------------------------------------------------------------- features
class _Files(torch.utils.data.Dataset):
    """Image files -> ``(tensor, -1, index)``, ``None`` for an unreadable one."""

    def __init__(self, files: Sequence[str], transform) -> None:
        self.files, self.transform = list(files), transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from ssl_xcit.data.common import DECODE_ERRORS, load_rgb
        try:
            return self.transform(load_rgb(self.files[i])), -1, i
        except DECODE_ERRORS as err:
            logger.warning("skipping unreadable image %s: %s", self.files[i], err)
            return None


def square_transform(imsize: int, normalize: bool = True):
    """DINO's copy-detection input: the whole image squashed to ``imsize`` x ``imsize`` (bicubic)."""
    from torchvision import transforms as T

    from ssl_xcit.data.common import IMAGENET_MEAN, IMAGENET_STD
    steps = [T.Resize((imsize, imsize), interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.ToTensor()]
    return T.Compose(steps + ([T.Normalize(IMAGENET_MEAN, IMAGENET_STD)] if normalize else []))


def raw_descriptors(model, files: Sequence[str], imsize: int, descriptors: Sequence[str], batch_size: int = 64,
                    num_workers: int = 2, device: str | torch.device = "cpu", progress: bool = True,
                    desc: str = "features") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``({descriptor: raw (N, D) float32}, rows kept)`` for ``files``; ``model`` ``None`` gives the
    ``pixels`` descriptor. Unreadable files are skipped (the rows kept say which)."""
    from ssl_xcit.evaluate.descriptors import describe, outputs_for
    from ssl_xcit.evaluate.features import feature_loader, iter_outputs
    pixels = model is None
    tf = square_transform(PIXEL_SIDE, normalize=False) if pixels else square_transform(imsize)
    loader = feature_loader(_Files(files, tf), range(len(files)), batch_size, num_workers, device)
    parts: dict[str, list[np.ndarray]] = {d: [] for d in descriptors}
    kept = []
    if pixels:
        from tqdm import tqdm
        for batch in tqdm(loader, desc=desc, disable=not progress, unit="batch"):
            if batch.images is not None:
                x = batch.images.flatten(1)
                parts[PIXELS].append((x - x.mean(dim=1, keepdim=True)).numpy())
                kept.append(batch.indices.numpy())
    else:
        names = tuple(dict.fromkeys(n for d in descriptors for n in outputs_for(d)))
        for out, _, idx, _ in iter_outputs(model, loader, names, device, progress=progress, desc=desc):
            if out:
                for d in descriptors:
                    parts[d].append(describe(out, d, normalize=False).numpy())
                kept.append(idx.numpy())
    if not kept:
        raise CopyBenchError(f"{desc}: none of the {len(files)} images could be read")
    return {d: np.concatenate(v).astype(np.float32) for d, v in parts.items()}, np.concatenate(kept)


# --------------------------------------------------------------------------------------------- scoring
def evaluate_copies(bench: Benchmark, model, name: str, descriptors: Sequence[str], imsize: int,
                    whiten_files: Sequence[str] | None = None, batch_size: int = 64, num_workers: int = 2,
                    device: str | torch.device = "cpu", progress: bool = True) -> list[dict]:
    """One row per descriptor (and, with ``whiten_files``, per whitening off / on) of ``model``
    (``None``: the pixels baseline) on ``bench``: mAP and recall@1, overall and per edit family."""
    from ssl_xcit.evaluate.descriptors import Whitening, l2n
    kw = dict(batch_size=batch_size, num_workers=num_workers, device=device, progress=progress)
    q, q_rows = raw_descriptors(model, [x["path"] for x in bench.queries], imsize, descriptors, desc="copies", **kw)
    db, db_rows = raw_descriptors(model, bench.database, imsize, descriptors, desc="database", **kw)
    n_orig = len(bench.originals)
    if len(q_rows) != len(bench.queries) or (db_rows < n_orig).sum() != n_orig:
        raise CopyBenchError(f"images of the benchmark in {bench.folder} cannot be read any more: build it again "
                             "in a new folder")
    where = {int(r): k for k, r in enumerate(db_rows)}
    positive = np.array([where[x["original"]] for x in bench.queries])
    white = raw_descriptors(model, whiten_files, imsize, descriptors, desc="whitening", **kw)[0] if whiten_files else None
    rows = []
    for d in descriptors:
        for whitened in ([False, True] if white is not None else [False]):
            if whitened:
                w = Whitening.fit(white[d])
                qq, dd = w.apply(q[d]), w.apply(db[d])
            else:
                qq, dd = l2n(q[d]), l2n(db[d])
            ranks = positive_ranks(qq, dd, positive)
            rows.append({"model": name, "descriptor": d, "whitened": whitened, "dim": int(qq.shape[1]),
                         "database": int(len(dd)), **copy_scores(ranks, bench.queries)})
    return rows


def results_table(rows: Sequence[dict]) -> str:
    """A Markdown table: overall mAP / recall@1 and mAP per edit family (percent)."""
    families = list(rows[0]["by_family"]) if rows else []
    head = "| model | descriptor | whitened | mAP | R@1 | " + " | ".join(families) + " |"
    lines = [head, "|" + "---|" * (5 + len(families))]
    for r in rows:
        fam = " | ".join(f"{100 * r['by_family'][f]['mAP']:.1f}" for f in families)
        lines.append(f"| {r['model']} | {r['descriptor']} | {'yes' if r['whitened'] else 'no'} | "
                     f"{100 * r['all']['mAP']:.1f} | {100 * r['all']['recall@1']:.1f} | {fam} |")
    return "\n".join(lines)


def results_png(rows: Sequence[dict]) -> bytes:
    """Grouped bars: mAP per edit family for every (model, descriptor, whitening) row, as PNG bytes."""
    import io

    from ssl_xcit.evaluate.figures import pyplot
    plt = pyplot()
    families = list(rows[0]["by_family"])
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(families)), 3.6))
    width = 0.8 / len(rows)
    for k, r in enumerate(rows):
        label = f"{Path(r['model']).parent.name or r['model']}/{r['descriptor']}{' +whit.' if r['whitened'] else ''}"
        ax.bar(np.arange(len(families)) + k * width, [100 * r["by_family"][f]["mAP"] for f in families], width,
               label=label)
    ax.set_xticks(np.arange(len(families)) + 0.4 - width / 2, families, rotation=30)
    ax.set_ylabel("mAP (%)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()

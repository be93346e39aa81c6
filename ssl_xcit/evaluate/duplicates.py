"""Near-duplicate images in a feature export: pairs above a cosine threshold, grouped.

* Pairs: a range search of every image against all others with :mod:`ssl_xcit.evaluate.knn_index`'s
  indexes. Exact (faiss ``flat`` range search) below ``AUTO_MIN_TRAIN`` images; from there the
  k-NN ``cells`` index, searched cell by cell with matrix products, its ``nprobe`` calibrated: the
  smallest number of cells in which a sample of images finds ``recall`` of its exact nearest other
  image. A duplicate is nearer than a typical nearest neighbour, so it lies in a probed cell at
  least as often. (Exact range search of 100,000 x 384 costs ~100 s on 2 cores; cells ~25 s.)
* ``top_pairs`` instead of a threshold: the ``n`` most similar pairs, from each image's
  ``TOP_PAIRS_K`` nearest neighbours (a pair is missed only when both images have more than that
  many neighbours nearer than it -- a group larger than the list, which a threshold then finds).
* Groups: connected components of the pair graph (duplicates of duplicates are one group).
* Choosing a threshold: :func:`nn_histogram` -- the nearest-neighbour cosine of a sample of images.
  Copies make a spike near 1 apart from the bulk; the threshold goes in the valley between them.
* Keeping: :func:`choose_kept` names one image per group (``first``: lowest row, i.e. first in the
  export's order; ``largest``: most pixels, then most bytes) and the list of files a cleaned data set
  keeps. Nothing is ever deleted.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from ssl_xcit.errors import UserError, hinted
from ssl_xcit.evaluate.knn_index import AUTO_MIN_TRAIN, IndexConfig, build_index

logger = logging.getLogger(__name__)

TOP_PAIRS_K = 20
KEEP_RULES = ("first", "largest")
HIST_SAMPLE = 2000
MAX_PAIRS = 20_000_000   # ~0.5 GB of pairs: a threshold that finds more is below the duplicates' range


def _check_pair_count(n: int, threshold: float) -> None:
    if n > MAX_PAIRS:
        raise hinted(DuplicatesError, f"more than {MAX_PAIRS:,} pairs have a cosine >= {threshold}: that is "
                     "similar images, not duplicates", "pass a higher threshold (see the histogram of "
                     "nearest-neighbour scores), or top_pairs_n", needs="threshold")


class DuplicatesError(UserError, ValueError):
    """A threshold, pair count or keep rule that cannot be used."""


def check_threshold(threshold: float) -> None:
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or not -1.0 <= threshold <= 1.0:
        raise hinted(DuplicatesError, f"the threshold is a cosine similarity, in [-1, 1]; got {threshold}",
                     "pass threshold in [-1, 1] (e.g. 0.95; see the histogram of nearest-neighbour scores)",
                     needs="threshold")


@dataclass
class Pairs:
    """Image pairs ``(i, j)``, ``i < j``, and their cosine ``score``, highest first."""

    i: np.ndarray
    j: np.ndarray
    score: np.ndarray
    method: str          # flat, cells (nlist, nprobe) or top-k of one of them
    seconds: float

    def __len__(self) -> int:
        return len(self.score)


def _sorted_pairs(i: np.ndarray, j: np.ndarray, s: np.ndarray, method: str, start: float) -> Pairs:
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    keep = lo != hi
    lo, hi, s = lo[keep], hi[keep], s[keep]
    key = lo.astype(np.int64) * (int(hi.max(initial=0)) + 1) + hi       # one entry per unordered pair
    _, first = np.unique(key, return_index=True)
    lo, hi, s = lo[first], hi[first], s[first]
    order = np.lexsort((hi, lo, -s))
    return Pairs(lo[order], hi[order], s[order].astype(np.float32), method, time.perf_counter() - start)


def pair_index(x: np.ndarray, kind: str = "auto", recall: float = 0.999, seed: int = 0):
    """``(index over unit x, description)``: faiss ``flat``, or the k-NN ``cells`` index with its
    nprobe calibrated on a sample of rows (their exact nearest other row found at ``recall``)."""
    n = len(x)
    if kind == "auto":
        kind = "cells" if n >= AUTO_MIN_TRAIN else "flat"
    if kind == "flat":
        return build_index(x, IndexConfig(kind="flat")), "flat"
    index = build_index(x, IndexConfig(kind="cells", recall=recall), seed=seed)
    rng = np.random.default_rng(seed)
    sample = torch.from_numpy(np.ascontiguousarray(x[rng.choice(n, min(1000, n), replace=False)], dtype=np.float32))
    index.nprobe = index.calibrate(sample, min(2, n))
    return index, f"cells (nlist={index.nlist}, nprobe={index.nprobe})"


def _range_flat(index, x: np.ndarray, threshold: float, batch: int, progress: bool):
    from tqdm import tqdm
    # faiss keeps inner products > radius; a hair below the threshold keeps those equal to it
    radius = float(np.nextafter(np.float32(threshold), np.float32(-2)))
    parts_i, parts_j, parts_s = [], [], []
    for s in tqdm(range(0, len(x), batch), desc="range search", unit="batch", disable=not progress):
        lims, d, ids = index.index.range_search(np.ascontiguousarray(x[s:s + batch], dtype=np.float32), radius)
        parts_i.append(np.repeat(np.arange(s, s + len(lims) - 1), np.diff(lims.astype(np.int64))))
        parts_j.append(ids)
        parts_s.append(d)
        _check_pair_count(sum(map(len, parts_s)), threshold)
    return (np.concatenate(p) for p in (parts_i, parts_j, parts_s))


def _range_cells(index, x: np.ndarray, threshold: float, progress: bool):
    """Range search cell by cell: the rows probing a cell are scored against it in one matrix
    product (BLAS), as the k-NN ``cells`` search does; 2-4x faster than faiss's IVF range search here."""
    from tqdm import tqdm
    q = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    nprobe = index.nprobe
    to_centre, probe = (q @ index.centroids.T).topk(nprobe, dim=1)
    to_centre, probe = to_centre.flatten(), probe.flatten()
    order = torch.argsort(probe, stable=True)
    per_cell, offsets = torch.bincount(probe, minlength=index.nlist).tolist(), index.offsets.tolist()
    parts_i, parts_j, parts_s, pos = [], [], [], 0
    for cell, m in enumerate(tqdm(per_cell, desc="range search", unit="cell", disable=not progress)):
        pairs = order[pos:pos + m]
        pos += m
        lo, hi = offsets[cell], offsets[cell + 1]
        if m == 0 or hi == lo:
            continue
        rows = pairs // nprobe
        sims = q[rows] @ index.data[lo:hi].float().T + to_centre[pairs, None]
        a, b = (sims >= threshold).nonzero(as_tuple=True)
        parts_i.append(rows[a].numpy())
        parts_j.append(index.ids[lo + b].numpy())
        parts_s.append(sims[a, b].numpy())
        _check_pair_count(sum(map(len, parts_s)), threshold)
    if not parts_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return (np.concatenate(p) for p in (parts_i, parts_j, parts_s))


def range_pairs(x: np.ndarray, threshold: float, kind: str = "auto", batch: int = 4096,
                progress: bool = False) -> Pairs:
    """Every pair of rows of unit ``x`` whose cosine is >= ``threshold``."""
    check_threshold(threshold)
    start = time.perf_counter()
    index, method = pair_index(x, kind)
    if method == "flat":
        i, j, sc = _range_flat(index, x, threshold, batch, progress)
    else:
        i, j, sc = _range_cells(index, x, threshold, progress)
    keep = sc >= threshold
    return _sorted_pairs(i[keep], j[keep], sc[keep], method, start)


def top_pairs(x: np.ndarray, n_pairs: int, kind: str = "auto", k: int = TOP_PAIRS_K) -> Pairs:
    """The ``n_pairs`` most similar pairs of rows of unit ``x`` (module doc)."""
    if not isinstance(n_pairs, int) or n_pairs < 1:
        raise hinted(DuplicatesError, f"the number of top pairs must be positive, got {n_pairs}",
                     "pass top_pairs >= 1", needs="top_pairs")
    start = time.perf_counter()
    index, method = pair_index(x, kind)
    k = min(k + 1, len(x))
    d, ids = index.search(np.ascontiguousarray(x, dtype=np.float32), k)  # cells: the calibrated nprobe
    i = np.repeat(np.arange(len(x)), k)
    found = ids.reshape(-1) >= 0
    pairs = _sorted_pairs(i[found], ids.reshape(-1)[found], d.reshape(-1)[found], f"top-{k - 1} of {method}", start)
    n = min(n_pairs, len(pairs))
    return Pairs(pairs.i[:n], pairs.j[:n], pairs.score[:n], pairs.method, time.perf_counter() - start)


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected-component label of each of ``n`` nodes given edges ``(i, j)`` (union-find)."""
    parent = np.arange(n)

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a
    for a, b in zip(i.tolist(), j.tolist()):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(a) for a in range(n)])


def histogram_edges(lo: float, bins: int = 30, closest: float = 1e-5) -> np.ndarray:
    """Cosine bin edges from ``lo`` to 1, even in log(1 - cosine): copies (1 - cos ~1e-4..1e-2) and
    merely similar images (1e-2..1e-1) fall in different bins, which even bins in cosine would mix."""
    gaps = np.logspace(np.log10(max(1.0 - lo, 10 * closest)), np.log10(closest), bins)
    return np.concatenate([1.0 - gaps, [1.0]])


def nn_histogram(x: np.ndarray, sample: int = HIST_SAMPLE, bins: int = 30, seed: int = 0) -> dict:
    """Histogram of the nearest-neighbour cosine (itself excluded) of up to ``sample`` rows (exact),
    in :func:`histogram_edges` bins (the last bin holds 1 - cos < 1e-5: exact copies)."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(x), min(sample, len(x)), replace=False))
    index = build_index(x, IndexConfig(kind="flat"))
    d, ids = index.search(np.ascontiguousarray(x[rows], dtype=np.float32), min(2, len(x)))
    own = ids[:, 0] == rows
    nn = np.where(own, d[:, -1], d[:, 0]) if d.shape[1] > 1 else np.full(len(rows), np.nan)
    lo = float(min(0.0, np.nanmin(nn))) if len(nn) else 0.0
    edges = histogram_edges(lo, bins)
    counts, _ = np.histogram(np.clip(nn[np.isfinite(nn)], lo, 1.0), bins=edges)
    return {"sample": int(len(rows)), "counts": counts.tolist(), "edges": [round(float(e), 6) for e in edges],
            "nn_scores": nn.astype(float).tolist()}


def text_histogram(hist: dict, width: int = 40) -> str:
    """The histogram as text bars, for the terminal."""
    counts = np.asarray(hist["counts"])
    top = max(int(counts.max(initial=0)), 1)
    lines = [f"nearest-neighbour cosine of {hist['sample']} sampled images:"]
    for c, lo, hi in zip(counts, hist["edges"][:-1], hist["edges"][1:]):
        if c:
            lines.append(f"  [{lo:7.5f}, {hi:7.5f}{']' if hi == 1.0 else ')'}  {'#' * max(1, round(width * c / top)):<{width}} {c}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- groups
def group_pairs(pairs: Pairs, n: int) -> list[dict]:
    """Groups of rows joined by pairs, largest first: ``{"group", "rows", "max_score", "pairs"}``."""
    if not len(pairs):
        return []
    label = components(n, pairs.i, pairs.j)
    members: dict[int, list[int]] = {}
    for r in np.unique(np.concatenate([pairs.i, pairs.j])).tolist():
        members.setdefault(int(label[r]), []).append(r)
    edges: dict[int, list[tuple[int, int, float]]] = {}
    for a, b, s in zip(pairs.i.tolist(), pairs.j.tolist(), pairs.score.tolist()):
        edges.setdefault(int(label[a]), []).append((a, b, s))
    groups = sorted(members.items(), key=lambda kv: (-len(kv[1]), -max(e[2] for e in edges[kv[0]]), kv[1][0]))
    return [{"group": g, "rows": rows, "max_score": max(e[2] for e in edges[lab]),
             "pairs": [{"a": a, "b": b, "score": s} for a, b, s in edges[lab]]}
            for g, (lab, rows) in enumerate(groups, start=1)]


def _size_key(path: str) -> tuple[int, int]:
    from ssl_xcit.data.common import DECODE_ERRORS, read_size
    try:
        w, h = read_size(path)
        return w * h, os.path.getsize(path)
    except DECODE_ERRORS:
        return -1, -1


def choose_kept(groups: list[dict], paths: list[str], rule: str) -> list[str]:
    """Set each group's ``keep`` (the path kept) and return every path a cleaned set keeps, in order."""
    if rule not in KEEP_RULES:
        raise hinted(DuplicatesError, f"unknown keep rule {rule!r}", f"pass keep as one of {', '.join(KEEP_RULES)}",
                     needs="keep")
    dropped: set[int] = set()
    for g in groups:
        rows = sorted(g["rows"])
        best = rows[0] if rule == "first" else max(rows, key=lambda r: (*_size_key(paths[r]), -r))
        g["keep"] = paths[best]
        dropped.update(r for r in rows if r != best)
    return [p for r, p in enumerate(paths) if r not in dropped]


# --------------------------------------------------------------------------------------------- run
def find_duplicates(features: str | os.PathLike, threshold: float | None = None, top_pairs_n: int | None = None,
                    descriptor: str = "cls", kind: str = "auto", keep: str | None = None,
                    progress: bool = True) -> dict:
    """Groups of near-duplicate images of the export in ``features`` (every input checked first).

    Exactly one of ``threshold`` (a cosine in [-1, 1]) and ``top_pairs_n``. With ``keep``
    (``first`` / ``largest``) each group names the image kept and ``result["kept"]`` lists the files
    a cleaned data set keeps. Returns a JSON-ready dict (groups with paths, the histogram, timings).
    """
    from ssl_xcit.evaluate.descriptors import check_descriptor
    from ssl_xcit.evaluate.exported import check_can_describe, open_export, read_descriptors
    if (threshold is None) == (top_pairs_n is None):
        raise hinted(DuplicatesError, "give either a threshold or a number of top pairs",
                     "pass threshold= or top_pairs_n=", needs="threshold_or_top_pairs")
    if threshold is not None:
        check_threshold(threshold)
    if keep is not None and keep not in KEEP_RULES:
        choose_kept([], [], keep)  # raises the one-line error
    check_descriptor(descriptor)
    view = open_export(features)
    check_can_describe(view, descriptor)
    t0 = time.perf_counter()
    x = read_descriptors(view, descriptor, progress=progress)
    t1 = time.perf_counter()
    hist = nn_histogram(x)
    t2 = time.perf_counter()
    pairs = range_pairs(x, threshold, kind, progress=progress) if threshold is not None else top_pairs(x, top_pairs_n, kind)
    paths = view.paths()
    groups = group_pairs(pairs, len(x))
    for g in groups:
        g["paths"] = [paths[r] for r in g["rows"]]
        for p in g["pairs"]:
            p["path_a"], p["path_b"] = paths[p["a"]], paths[p["b"]]
    result = {"features": str(view.folder), "fingerprint": view.fingerprint, "descriptor": descriptor,
              "images": len(x), "threshold": threshold, "top_pairs": top_pairs_n, "method": pairs.method,
              "n_pairs": len(pairs), "n_groups": len(groups),
              "n_in_groups": int(sum(len(g["rows"]) for g in groups)), "groups": groups, "histogram": hist,
              "timing": {"read_s": t1 - t0, "histogram_s": t2 - t1, "pairs_s": pairs.seconds,
                         "groups_s": time.perf_counter() - t2 - pairs.seconds}}
    if keep is not None:
        result["keep_rule"] = keep
        result["kept"] = choose_kept(groups, paths, keep)
    return result


def _histogram_png(hist: dict, threshold: float | None) -> bytes:
    import io

    from ssl_xcit.evaluate.figures import pyplot
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    gap = np.maximum(1.0 - np.asarray(hist["edges"]), 1e-6)  # distance to 1, log scale: copies apart
    ax.bar(gap[:-1], hist["counts"], width=gap[1:] - gap[:-1], align="edge", color="#48c", edgecolor="white")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ticks = [t for t in (0.5, 0.9, 0.99, 0.999, 0.9999) if 1 - t <= gap[0]]
    ax.set_xticks([1 - t for t in ticks], [str(t) for t in ticks])
    ax.set_yscale("symlog")
    if threshold is not None and threshold < 1:
        ax.axvline(1 - threshold, color="#c33", label=f"threshold {threshold}")
        ax.legend()
    ax.set_xlabel("cosine to the nearest other image (log scale in 1 - cosine)")
    ax.set_ylabel("images (of a sample)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_duplicates(result: dict, out_dir: str | os.PathLike, html_page: bool = True,
                     max_html_groups: int = 200) -> dict[str, "os.PathLike"]:
    """``duplicates.json``, ``duplicates.csv`` (group, score, path_a, path_b per pair), ``histogram.png``,
    ``index.html`` (the histogram and the first ``max_html_groups`` groups as thumbnails) and, with
    a keep rule, ``keep.txt`` (one path a line: the files a cleaned data set keeps). Atomic writes."""
    import base64
    import csv
    import html
    import io
    from pathlib import Path

    from ssl_xcit.atomic import atomic_write, atomic_write_json, atomic_write_text
    from ssl_xcit.evaluate import gallery
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": atomic_write_json(out / "duplicates.json", result, indent=1)}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["group", "score", "path_a", "path_b"])
    for g in result["groups"]:
        for p in g["pairs"]:
            w.writerow([g["group"], f"{p['score']:.6f}", p["path_a"], p["path_b"]])
    written["csv"] = atomic_write_text(out / "duplicates.csv", buf.getvalue())
    if "kept" in result:
        written["keep"] = atomic_write_text(out / "keep.txt", "".join(p + "\n" for p in result["kept"]))
    png = _histogram_png(result["histogram"], result["threshold"])

    def write_png(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(png)
    written["histogram"] = atomic_write(out / "histogram.png", write_png)
    if html_page:
        crit = (f"cosine >= {result['threshold']}" if result["threshold"] is not None
                else f"the {result['top_pairs']} most similar pairs")
        intro = (f"{result['n_groups']} group(s), {result['n_in_groups']} images, {result['n_pairs']} pair(s) with "
                 f"{crit} among {result['images']} images of {result['features']} ({result['method']}).")
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        hist = (f'<h2>Nearest-neighbour scores</h2><figure><img src="{uri}" alt="histogram"><figcaption>'
                f"{html.escape('choose the threshold in the gap between the spike near 1 and the bulk')}"
                "</figcaption></figure>")
        shown = result["groups"][:max_html_groups]
        more = [f"<p class=note>{len(result['groups']) - len(shown)} more group(s) in duplicates.json</p>"] \
            if len(result["groups"]) > len(shown) else []
        written["html"] = gallery.write_page(out / "index.html", "Near-duplicate images", intro,
                                             [hist, *map(gallery.group_section, shown), *more])
    return written

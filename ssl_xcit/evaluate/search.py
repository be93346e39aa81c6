"""Similarity search over a feature export: which images of the export look most like these?

The queries are embedded by the export's own model with the export's own settings, read from its
manifest (checkpoint, arch, checkpoint key, crop, resize, seed), and the model loaded is checked
against the weights sha256 the export recorded: a query embedded by another network would be
compared with features it has nothing in common with, and the results would look plausible.

The index (:mod:`ssl_xcit.evaluate.knn_index`: exact below ``AUTO_MIN_TRAIN`` images, the calibrated
``cells`` index above) is built once and saved next to the export in ``search-index/``, with the
export's fingerprint (:func:`ssl_xcit.evaluate.exported.fingerprint`); a later search loads it, and
rebuilds it when the export was redone since. ``cells`` fixes its ``nprobe`` when built (calibrated
on a sample of the export's own rows, whose true neighbours it finds with exact search), so a
single query costs a few cells, not a calibration.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ssl_xcit.atomic import atomic_torch_save, atomic_write, atomic_write_json, atomic_write_text
from ssl_xcit.errors import UserError, hinted
from ssl_xcit.evaluate.descriptors import check_descriptor, describe, outputs_for
from ssl_xcit.evaluate.exported import ExportView, check_can_describe, read_descriptors
from ssl_xcit.evaluate.knn_index import CellIndex, FeatureIndex, IndexConfig, build_index

logger = logging.getLogger(__name__)

INDEX_DIR = "search-index"
CALIBRATION_K = 10


class SearchError(UserError, ValueError):
    """A search that cannot run as asked (k, the query, the model of the export)."""


@dataclass
class LoadedIndex:
    index: FeatureIndex | CellIndex
    kind: str       # flat or cells
    built: bool     # built by this call (False: loaded from search-index/)
    seconds: float  # time to build or load


def _index_paths(view: ExportView, descriptor: str) -> tuple[Path, Path]:
    folder = view.folder / INDEX_DIR
    return folder / f"{descriptor}.json", folder / f"{descriptor}.index"


def _save_index(index: FeatureIndex | CellIndex, kind: str, path: Path) -> None:
    if kind == "cells":
        atomic_torch_save({"centroids": index.centroids, "data": index.data, "ids": index.ids,
                           "offsets": index.offsets, "nprobe": index.nprobe, "recall": index.recall}, path)
    else:
        import faiss
        atomic_write(path, lambda tmp: faiss.write_index(index.index, tmp))


def _load_index(kind: str, path: Path) -> FeatureIndex | CellIndex:
    if kind == "cells":
        s = torch.load(path, map_location="cpu", weights_only=True)
        return CellIndex(s["centroids"], s["data"], s["ids"], s["offsets"], s["nprobe"], s["recall"])
    import faiss
    index = faiss.read_index(str(path))
    return FeatureIndex(index, None, int(index.ntotal) * int(index.d) * 4)


def build_search_index(features: np.ndarray, kind: str = "auto", seed: int = 0) -> tuple[FeatureIndex | CellIndex, str]:
    """An inner-product index over unit ``features``; a ``cells`` index gets its nprobe calibrated now
    (true ``CALIBRATION_K`` neighbours of up to 256 of its own rows found at the configured recall)."""
    cfg = IndexConfig(kind=kind).resolved(len(features))
    index = build_index(features, cfg, seed=seed)
    if cfg.kind == "cells":
        g = np.random.default_rng(seed)
        sample = features[np.sort(g.choice(len(features), min(256, len(features)), replace=False))]
        index.nprobe = index.calibrate(torch.from_numpy(sample), min(CALIBRATION_K, len(features)))
        logger.info("cells index: %d cells, nprobe %d (recall %.4f on the sample)", index.nlist, index.nprobe,
                    index.last_recall)
    return index, cfg.kind


def load_or_build_index(view: ExportView, descriptor: str = "cls", kind: str = "auto", rebuild: bool = False,
                        progress: bool = False) -> LoadedIndex:
    """The export's saved index when its fingerprint, descriptor and kind match; else built (and
    saved next to the export when the folder is writable -- a read-only export is searched all the same)."""
    start = time.perf_counter()
    meta_path, index_path = _index_paths(view, descriptor)
    want = {"fingerprint": view.fingerprint, "descriptor": descriptor, "rows": view.rows}
    if not rebuild and meta_path.is_file() and index_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
        if {k: meta.get(k) for k in want} == want and kind in ("auto", meta.get("kind")):
            index = _load_index(meta["kind"], index_path)
            return LoadedIndex(index, meta["kind"], False, time.perf_counter() - start)
        logger.info("%s: the export changed since its index was built (or other settings): rebuilding", view.folder)
    feats = read_descriptors(view, descriptor, progress=progress)
    index, resolved = build_search_index(feats, kind)
    try:
        meta_path.parent.mkdir(exist_ok=True)
        meta_path.unlink(missing_ok=True)   # no record until the new index is whole: a crash means a rebuild
        _save_index(index, resolved, index_path)
        atomic_write_json(meta_path, {**want, "kind": resolved, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                        time.gmtime())}, indent=2)
    except OSError as err:  # a read-only export: search it all the same, rebuild next time
        logger.warning("search index not saved in %s (%s): it will be built again next time", meta_path.parent, err)
    return LoadedIndex(index, resolved, True, time.perf_counter() - start)


def check_k(k: int, rows: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise hinted(SearchError, f"k must be a positive number of neighbours, got {k}", "pass k >= 1", needs="k")
    if k > rows:
        raise hinted(SearchError, f"k={k} is larger than the export, which holds {rows} image(s)",
                     f"pass k <= {rows}", needs="k")


def search_features(index: FeatureIndex | CellIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(cosine scores (Q, k), export rows (Q, k))``, best first (rows -1 where fewer were found)."""
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


# --------------------------------------------------------------------------------------------- queries
def query_files(query: str | os.PathLike) -> list[Path]:
    """The image ``query`` itself, or every image below the folder ``query`` (sorted)."""
    from ssl_xcit.data.common import IMAGE_EXTENSIONS
    path = Path(query).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise SearchError(f"query {path}: no such image or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise SearchError(f"query folder {path} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _checkpoint_of(view: ExportView, checkpoint: str | None) -> str:
    ckpt = checkpoint or view.source.get("checkpoint")
    if not ckpt:
        raise hinted(SearchError, f"the export in {view.folder} does not record its checkpoint",
                     "pass checkpoint= the one it was made with", needs="checkpoint")
    if Path(ckpt).expanduser().exists():
        return str(Path(ckpt).expanduser())
    from ssl_xcit.models.zoo import resolve
    try:
        resolve(ckpt)  # a model name: a random-init backbone, rebuilt from the recorded seed
    except ValueError:
        raise hinted(SearchError, f"the checkpoint the export was made with, {ckpt}, is not there (moved, or "
                     "a path relative to where the export ran)", "pass checkpoint= its path now",
                     needs="checkpoint") from None
    return ckpt


def query_model(view: ExportView, checkpoint: str | None = None, device: str | torch.device = "cpu"):
    """``(model, transform)``: the export's backbone (weights checked against its manifest) and its
    eval transform (crop and resize from the manifest)."""
    from ssl_xcit.evaluate.backbone import load_frozen_backbone
    from ssl_xcit.evaluate.datasets import eval_transform
    from ssl_xcit.evaluate.export import weights_sha256
    src = view.source
    ckpt = _checkpoint_of(view, checkpoint)
    model = load_frozen_backbone(ckpt, src.get("arch"), src.get("checkpoint_key") or "teacher", device,
                                 seed=int(src.get("seed") or 0))
    want = (view.manifest.get("model") or {}).get("weights_sha256")
    if want and weights_sha256(model) != want:
        raise hinted(SearchError, f"the weights in {ckpt} are not the ones the export in {view.folder} was made "
                     f"with (weights sha256 {want[:16]}...): queries would be embedded by another network",
                     "pass checkpoint= the file the export was made with", needs="checkpoint")
    if "crop_size" not in src:
        raise SearchError(f"the export in {view.folder} does not record its crop size: export it again")
    return model, eval_transform(int(src["crop_size"]), src.get("resize"))


def embed_images(model, transform, files: list[Path], descriptor: str, device: str | torch.device = "cpu",
                 batch_size: int = 32) -> tuple[np.ndarray, list[Path]]:
    """Unit ``descriptor`` rows of the readable ``files`` and those files. A single query that cannot
    be read is an error; in a folder, unreadable images are skipped with a warning."""
    from ssl_xcit.data.common import DECODE_ERRORS, load_rgb
    from ssl_xcit.evaluate.backbone import backbone_outputs
    images, ok = [], []
    for f in files:
        try:
            images.append(transform(load_rgb(str(f))))
            ok.append(f)
        except DECODE_ERRORS as err:
            if len(files) == 1:
                raise SearchError(f"cannot read the query image {f}: {type(err).__name__}: {err}") from None
            logger.warning("skipping unreadable query image %s: %s", f, err)
    if not ok:
        raise SearchError(f"none of the {len(files)} query images could be read")
    rows = []
    for s in range(0, len(images), batch_size):
        out = backbone_outputs(model, torch.stack(images[s:s + batch_size]).to(device), outputs_for(descriptor))
        rows.append(describe({k: v.cpu() for k, v in out.items()}, descriptor).numpy())
    return np.concatenate(rows), ok


# --------------------------------------------------------------------------------------------- run
def search_images(features: str | os.PathLike, query: str | os.PathLike, k: int = 10, descriptor: str = "cls",
                  checkpoint: str | None = None, device: str | torch.device = "cpu", kind: str = "auto",
                  rebuild: bool = False, progress: bool = True) -> dict:
    """Search the export in ``features`` for the ``k`` nearest images of each query image.

    Every input is checked before the model is loaded or a file is written. Returns
    ``{"queries": [{"query", "results": [{"rank", "row", "path", "score"}]}], "timing": {...}, ...}``;
    ``timing`` says apart the index (build or load), the model, the query embedding and the search.
    """
    from ssl_xcit.evaluate.exported import open_export
    check_descriptor(descriptor)
    view = open_export(features)
    check_can_describe(view, descriptor)
    check_k(k, view.rows)
    files = query_files(query)
    t0 = time.perf_counter()
    model, transform = query_model(view, checkpoint, device)
    t1 = time.perf_counter()
    qfeats, files = embed_images(model, transform, files, descriptor, device)
    t2 = time.perf_counter()
    loaded = load_or_build_index(view, descriptor, kind, rebuild, progress)
    t3 = time.perf_counter()
    scores, rows = search_features(loaded.index, qfeats, k)
    t4 = time.perf_counter()
    paths = view.paths()
    out = []
    for f, sc, rw in zip(files, scores, rows):
        hits = [{"rank": r + 1, "row": int(j), "path": paths[j], "score": float(s)}
                for r, (s, j) in enumerate(zip(sc, rw)) if j >= 0]
        out.append({"query": str(f), "results": hits})
    return {"features": str(view.folder), "descriptor": descriptor, "k": k, "index": loaded.kind,
            "index_built": loaded.built, "fingerprint": view.fingerprint, "queries": out,
            "timing": {"load_model_s": t1 - t0, "embed_queries_s": t2 - t1, "index_s": t3 - t2, "search_s": t4 - t3}}


def default_out(features: str | os.PathLike, query: str | os.PathLike) -> Path:
    """``FEATURES/searches/<query name>``: results stay with the export they were found in."""
    return Path(features).expanduser() / "searches" / (Path(query).expanduser().resolve().stem or "query")


def write_search_results(result: dict, out_dir: str | os.PathLike, html_page: bool = True) -> dict[str, Path]:
    """``results.json``, ``results.csv`` (query, rank, score, path) and ``index.html`` (thumbnails) in
    ``out_dir``, each written atomically."""
    from ssl_xcit.evaluate import gallery
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": atomic_write_json(out / "results.json", result, indent=2)}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["query", "rank", "score", "path", "row"])
    for q in result["queries"]:
        for h in q["results"]:
            w.writerow([q["query"], h["rank"], f"{h['score']:.6f}", h["path"], h["row"]])
    written["csv"] = atomic_write_text(out / "results.csv", buf.getvalue())
    if html_page:
        intro = (f"{len(result['queries'])} quer{'y' if len(result['queries']) == 1 else 'ies'} against the export "
                 f"{result['features']} (descriptor {result['descriptor']}, index {result['index']}); "
                 "scores are cosine similarities.")
        sections = [gallery.search_section(q["query"], q["results"]) for q in result["queries"]]
        written["html"] = gallery.write_page(out / "index.html", "Image search", intro, sections)
    return written

"""Nearest-neighbour search over train features for DINO's weighted k-NN.

Kinds (``IndexConfig.kind``):

* ``flat`` -- exact inner-product search with faiss (``IndexFlatIP``, or faiss GPU).
* ``cells`` -- an inverted file searched *cell by cell*. Train features are split into ``nlist``
  cells by spherical k-means (trained on a sample); each query looks in its ``nprobe`` most
  similar cells.

  - Speed: faiss's IVF walks the cells of one query after another (every query re-reads its
    cells from memory); here the queries of a block are grouped by cell and each cell is scored
    against all its queries with one matrix product -- DINO's arithmetic on a few percent of the
    train set. How few depends on how well the features cluster.
  - Accuracy: similarities of the features found are exact (float32); only neighbours in cells
    not probed are missed. ``nprobe`` is chosen per search unless given: exact search of 256
    sampled queries tells which cells their true k neighbours lie in, and the smallest ``nprobe``
    whose cells hold ``recall`` of them is used.
  - Memory: a feature is stored as its cell's centroid plus a residual, in float32, or in
    float16 (half) when ``fp16`` is set or float32 would pass :data:`FLOAT32_BUDGET` (ImageNet's
    1.28M x 384 features: 1.9 GiB in float32, 0.93 GiB so). Residuals are much shorter than the
    unit features, so float16 rounding moves similarities far less than float16 features would
    (a random network's features, all within cosine 0.998 of each other, lost a third of their
    true neighbours as float16 features, 0.5% as float16 residuals).

  Pure torch, so it runs on the CPU or a GPU.
* ``ivf`` / ``hnsw`` -- faiss's approximate indexes (IVF-Flat, HNSW), kept for comparison.
* ``auto`` -- ``flat`` below :data:`AUTO_MIN_TRAIN` train features; from there on the cells are
  built and calibrated on the queries, and ``cells`` searches only when the calibrated probes read at
  most :data:`AUTO_MAX_PROBED` of the train features, else exact ``flat`` does (:class:`AutoIndex`).
  Why measured, not by size alone: ``cells`` wins by how well the features cluster, which only the
  calibration tells (measurements in ``benchmarks/RESULTS.md``, "k-NN at scale").

Every index answers ``search(queries, k) -> (similarities, train ids)``, best first, id -1 where
fewer than ``k`` neighbours were found, and ``nbytes`` (the memory of the stored train features).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ssl_xcit.errors import SETTING, named
from ssl_xcit.evaluate.inputs import EvalInputError, check_positive

KINDS = ("flat", "cells", "ivf", "hnsw", "auto")
# auto: exact below this many train features; from here on cells when the calibrated probes read at
# most AUTO_MAX_PROBED of the rows (benchmarks/RESULTS.md: cells' cell-by-cell products do ~4x less
# work per second than faiss's exact scan, plus the build and calibration: 2% probed won 3x, 38% lost 2x)
AUTO_MIN_TRAIN = 100_000
AUTO_MAX_PROBED = 0.10
# cells: residuals are stored in float32 up to this many bytes, in float16 above
FLOAT32_BUDGET = 1 << 30


@dataclass(frozen=True)
class IndexConfig:
    """How to search: ``flat`` is exact; ``cells`` (or ``auto`` on large sets) is fast and calibrated."""

    kind: str = "flat"
    fp16: bool = False  # vectors stored as float16 (cells: float16 residuals, also above FLOAT32_BUDGET)
    use_gpu: bool = False  # faiss GPU for flat/ivf when the faiss build has GPUs; cells: torch on cuda
    nlist: int | None = None  # ivf/cells: number of cells (default: ivf ~4*sqrt(N), cells ~sqrt(N)/2)
    nprobe: int | None = None  # cells probed per query (ivf default 32; cells default: calibrated)
    hnsw_m: int = 32  # hnsw: graph degree
    ef_search: int = 256  # hnsw: search breadth
    recall: float = 0.9995  # cells: share of the true k neighbours the calibrated nprobe must find

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise named(EvalInputError, f"{SETTING} must be one of {', '.join(KINDS)}, got {self.kind!r}", "kind")
        for name in ("nprobe", "hnsw_m", "ef_search", "nlist"):
            check_positive(getattr(self, name), name)
        if not 0.0 < self.recall <= 1.0:
            raise EvalInputError(f"recall must lie in (0, 1], got {self.recall}")

    def resolved(self, n_train: int) -> "IndexConfig":
        """``auto`` made concrete for ``n_train`` features (other kinds unchanged)."""
        if self.kind != "auto":
            return self
        kind = "cells" if n_train >= AUTO_MIN_TRAIN else "flat"
        return IndexConfig(**{**self.__dict__, "kind": kind})


def _as_f32(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def faiss_gpu_available() -> bool:
    import faiss
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


# --------------------------------------------------------------------------------------------- faiss
class FeatureIndex:
    """A faiss index over train features (kept with the GPU resources it needs alive)."""

    def __init__(self, index, resources=None, nbytes: int = 0) -> None:
        self.index = index
        self._resources = resources
        self.nbytes = nbytes

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: torch.Tensor | np.ndarray, k: int, batch_size: int = 1000
               ) -> tuple[np.ndarray, np.ndarray]:
        """``(similarities (Q, k) float32, train row ids (Q, k) int64)``, best first; id -1 = none."""
        check_positive(k, "k")
        check_positive(batch_size, "query batch size")
        n = len(queries)
        sims = np.empty((n, k), dtype=np.float32)
        ids = np.empty((n, k), dtype=np.int64)
        for s in range(0, n, batch_size):
            d, i = self.index.search(_as_f32(queries[s:s + batch_size]), k)
            sims[s:s + batch_size], ids[s:s + batch_size] = d, i
        return sims, ids


def _faiss_index(train_features: torch.Tensor | np.ndarray, cfg: IndexConfig, add_batch: int,
                 seed: int) -> FeatureIndex:
    import faiss
    n, d = train_features.shape
    codec = "SQfp16" if cfg.fp16 else "Flat"
    vec_bytes = d * (2 if cfg.fp16 else 4)
    nlist = None
    if cfg.kind == "flat":
        key, nbytes = codec, n * vec_bytes
    elif cfg.kind == "ivf":
        nlist = cfg.nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
        if nlist > n:
            raise named(EvalInputError, f"{SETTING} {nlist} exceeds the {n} train features", "nlist")
        key, nbytes = f"IVF{nlist},{codec}", n * (vec_bytes + 8) + nlist * d * 4
    else:
        key, nbytes = f"HNSW{cfg.hnsw_m},{codec}", n * (vec_bytes + 2 * cfg.hnsw_m * 4)
    gpu = cfg.use_gpu and cfg.kind != "hnsw" and faiss_gpu_available()
    resources = None
    if gpu and cfg.kind == "flat":
        resources = faiss.StandardGpuResources()
        conf = faiss.GpuIndexFlatConfig()
        conf.useFloat16 = cfg.fp16
        conf.device = torch.cuda.current_device() if torch.cuda.is_available() else 0
        index = faiss.GpuIndexFlatIP(resources, d, conf)
    else:
        index = faiss.index_factory(d, key, faiss.METRIC_INNER_PRODUCT)
    if cfg.kind == "ivf":
        rng = np.random.default_rng(seed)
        n_train = min(n, 256 * nlist)
        sample = np.sort(rng.choice(n, n_train, replace=False)) if n_train < n else np.arange(n)
        index.train(_as_f32(train_features[torch.as_tensor(sample)] if isinstance(train_features, torch.Tensor)
                            else train_features[sample]))
        index.nprobe = min(cfg.nprobe or 32, nlist)
        if gpu:
            resources = faiss.StandardGpuResources()
            co = faiss.GpuClonerOptions()
            co.useFloat16 = cfg.fp16
            index = faiss.index_cpu_to_gpu(resources, torch.cuda.current_device(), index, co)
    elif cfg.kind == "hnsw":
        index.hnsw.efSearch = cfg.ef_search
    for s in range(0, n, add_batch):
        index.add(_as_f32(train_features[s:s + add_batch]))
    return FeatureIndex(index, resources, nbytes)


# --------------------------------------------------------------------------------------------- cells
def _matmul_chunks(x: torch.Tensor, y: torch.Tensor, chunk: int):
    """``(start, x[start:start+chunk] @ y.T)`` in float32 on ``y``'s device, chunk by chunk of ``x``."""
    for s in range(0, len(x), chunk):
        yield s, x[s:s + chunk].to(y.device, torch.float32) @ y.T


def spherical_kmeans(x: torch.Tensor, ncells: int, niter: int, generator: torch.Generator,
                     chunk: int = 16384) -> torch.Tensor:
    """``ncells`` unit centroids of unit rows ``x`` (Lloyd's iterations with cosine similarity).

    Starts from distinct random rows; a cell left empty is re-seeded with a random row.
    """
    n, d = x.shape
    start = torch.randperm(n, generator=generator, device="cpu")[:ncells].to(x.device)
    cent = torch.nn.functional.normalize(x[start].float(), dim=1)
    for _ in range(niter):
        assign = torch.empty(n, dtype=torch.long, device=x.device)
        for s, sim in _matmul_chunks(x, cent, chunk):
            assign[s:s + len(sim)] = sim.argmax(dim=1)
        sums = torch.zeros(ncells, d, device=x.device).index_add_(0, assign, x.float())
        empty = torch.bincount(assign, minlength=ncells) == 0
        if empty.any():
            pick = torch.randint(0, n, (int(empty.sum()),), generator=generator, device="cpu").to(x.device)
            sums[empty] = x[pick].float()
        cent = torch.nn.functional.normalize(sums, dim=1)
    return cent


class CellIndex:
    """Inverted-file search done cell by cell with matrix products (see the module docstring).

    ``data`` holds the train features sorted by cell as residuals to their cell's centroid
    (row ``j`` stands for ``centroids[cell_of[j]] + data[j]``), ``ids[j]`` is its original row, and
    cell ``c`` is ``data[offsets[c]:offsets[c + 1]]``.
    """

    def __init__(self, centroids: torch.Tensor, data: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor,
                 nprobe: int | None, recall: float, seed: int = 0) -> None:
        self.centroids, self.data, self.ids, self.offsets = centroids, data, ids, offsets
        self.cell_of = torch.repeat_interleave(torch.arange(len(centroids), device=data.device),
                                               offsets[1:] - offsets[:-1])  # sorted row -> cell
        self.nprobe, self.recall, self.seed = nprobe, recall, seed
        self.last_nprobe: int | None = None  # what the latest search used (reported by the benchmark)
        self.last_recall: float | None = None  # the recall measured on the calibration sample

    @property
    def ntotal(self) -> int:
        return len(self.data)

    @property
    def nlist(self) -> int:
        return len(self.centroids)

    @property
    def nbytes(self) -> int:
        """Stored train features, their ids and the centroids."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.ids, self.offsets, self.centroids))

    def search(self, queries: torch.Tensor | np.ndarray, k: int, batch_size: int = 1000
               ) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`FeatureIndex.search`. ``batch_size`` is ignored: queries go in blocks sized
        to hold their similarities to the probed cells in ~256 MB (1 GiB on a GPU), since
        grouping by cell needs many queries at once."""
        check_positive(k, "k")
        q = torch.as_tensor(queries).to(self.data.device, torch.float32)
        nprobe = min(self.nprobe or self.calibrate(q, k), self.nlist)
        self.last_nprobe = nprobe
        width = max(int((self.offsets[1:] - self.offsets[:-1]).max()), -(-k // nprobe))  # widest cell
        budget = (1 << 30) if self.data.is_cuda else (256 << 20)
        block = max(64, budget // (nprobe * width * 4))
        sims = np.empty((len(q), k), dtype=np.float32)
        ids = np.empty((len(q), k), dtype=np.int64)
        for s in range(0, len(q), block):
            d, i = self._search_block(q[s:s + block], k, nprobe, width)
            sims[s:s + block], ids[s:s + block] = d.cpu().numpy(), i.cpu().numpy()
        return sims, ids

    def _search_block(self, q: torch.Tensor, k: int, nprobe: int, width: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each (query, probed cell) pair gets a row of ``width`` similarities (-inf past the
        cell's end); one top-k over each query's rows then picks its neighbours. (One top-k over
        long rows: torch's CPU top-k costs ~15 us per row, so a top-k per cell was slower.)"""
        nq, dev = len(q), q.device
        to_centre, probe = (q @ self.centroids.T).topk(nprobe, dim=1)  # q . centroid of the probed cells
        to_centre, probe = to_centre.flatten(), probe.flatten()  # per (query, slot) pair
        order = torch.argsort(probe, stable=True)  # pairs grouped by cell
        per_cell = torch.bincount(probe, minlength=self.nlist).tolist()
        offsets = self.offsets.tolist()
        sims = torch.full((nq * nprobe, width), -math.inf, device=dev)
        pos = 0
        for cell, m in enumerate(per_cell):
            pairs = order[pos:pos + m]
            pos += m
            lo, hi = offsets[cell], offsets[cell + 1]
            if m == 0 or hi == lo:
                continue
            sims[pairs, :hi - lo] = q[pairs // nprobe] @ self.data[lo:hi].float().T + to_centre[pairs, None]
        v, where = sims.view(nq, nprobe * width).topk(k, dim=1)
        cell = probe.view(nq, nprobe).gather(1, where // width)
        rows = self.offsets[cell] + where % width  # rows of the sorted storage
        found = v > -math.inf
        out = torch.where(found, self.ids[rows.clamp(max=self.ntotal - 1)], torch.full_like(rows, -1))
        return v, out

    def calibrate(self, q: torch.Tensor, k: int, sample: int = 256) -> int:
        """The smallest nprobe whose cells hold ``recall`` of the true top-k neighbours of a sample
        of the queries (found by exact search). Exact within the probed cells, so this share is
        the search's recall on that sample."""
        g = torch.Generator().manual_seed(self.seed)
        pick = torch.randperm(len(q), generator=g)[:sample].to(q.device)
        qs = q[pick]
        k_eff = min(k, self.ntotal)
        best_s = torch.full((len(qs), k_eff), -math.inf, device=q.device)
        best_j = torch.zeros((len(qs), k_eff), dtype=torch.long, device=q.device)
        to_centre = qs @ self.centroids.T  # (sample, nlist)
        offsets, cell_of = self.offsets.tolist(), self.cell_of
        for lo in range(0, self.ntotal, 65536):  # exact similarities, a chunk of stored rows at a time
            hi = min(lo + 65536, self.ntotal)
            sim = qs @ self.data[lo:hi].float().T  # (sample, rows): q . residual
            for cell in range(int(cell_of[lo]), int(cell_of[hi - 1]) + 1):  # + q . centroid, cell by cell
                a, b = max(offsets[cell], lo), min(offsets[cell + 1], hi)
                sim[:, a - lo:b - lo] += to_centre[:, cell:cell + 1]
            v, j = sim.topk(min(k_eff, hi - lo), dim=1)
            v, j = torch.cat([best_s, v], 1), torch.cat([best_j, j + lo], 1)
            best_s, top = v.topk(k_eff, dim=1)
            best_j = j.gather(1, top)
        # rank of every cell for each sampled query, then the rank of each true neighbour's cell
        rank = torch.empty(len(qs), self.nlist, dtype=torch.long, device=q.device)
        rank.scatter_(1, to_centre.argsort(dim=1, descending=True),
                      torch.arange(self.nlist, device=q.device).expand(len(qs), -1))
        need = rank.gather(1, self.cell_of[best_j]).flatten()  # probes needed for each neighbour (-1)
        found = torch.bincount(need, minlength=self.nlist).cumsum(0).double() / need.numel()
        nprobe = int(torch.searchsorted(found, torch.tensor(self.recall - 1e-12, dtype=torch.float64,
                                                                   device=q.device)).item()) + 1
        self.last_recall = float(found[min(nprobe, self.nlist) - 1])
        return min(nprobe, self.nlist)


def _cell_index(train_features: torch.Tensor | np.ndarray, cfg: IndexConfig, seed: int,
                device: torch.device) -> CellIndex:
    x = torch.as_tensor(train_features)
    n, d = x.shape
    nlist = cfg.nlist or max(1, min(round(math.sqrt(n) / 2), n // 64))
    if nlist > n:
        raise named(EvalInputError, f"{SETTING} {nlist} exceeds the {n} train features", "nlist")
    g = torch.Generator().manual_seed(seed)
    sample = torch.randperm(n, generator=g)[:min(n, 32 * nlist)].to(x.device)
    cent = spherical_kmeans(x[sample].to(device, torch.float32), nlist, niter=8, generator=g)
    assign = torch.empty(n, dtype=torch.long, device=device)
    for s, sim in _matmul_chunks(x, cent, 65536):  # each feature to its most similar centroid
        assign[s:s + len(sim)] = sim.argmax(dim=1)
    order = torch.argsort(assign, stable=True)
    counts = torch.bincount(assign, minlength=nlist)
    offsets = torch.zeros(nlist + 1, dtype=torch.long, device=device)
    offsets[1:] = counts.cumsum(0)
    dtype = torch.float16 if cfg.fp16 or n * d * 4 > FLOAT32_BUDGET else torch.float32
    residual = torch.empty(n, d, dtype=dtype, device=device)
    bounds = offsets.tolist()
    for cell in range(nlist):  # residual = feature - its cell's centroid, one cell at a time
        lo, hi = bounds[cell], bounds[cell + 1]
        rows = torch.index_select(x, 0, order[lo:hi].to(x.device))
        residual[lo:hi] = rows.to(device, torch.float32) - cent[cell]
    return CellIndex(cent, residual, order, offsets, cfg.nprobe, cfg.recall, seed)


# --------------------------------------------------------------------------------------------- build
def build_index(train_features: torch.Tensor | np.ndarray, cfg: IndexConfig = IndexConfig(),
                add_batch: int = 262144, seed: int = 0) -> FeatureIndex | CellIndex:
    """An inner-product index holding ``train_features`` (row i -> id i); ``auto`` picks by size.

    faiss indexes get rows in float32 chunks, so float16 features are never widened all at once.
    """
    n = train_features.shape[0]
    if n == 0:
        raise EvalInputError("no train features to index (no readable train image?)")
    if cfg.kind == "auto" and n >= AUTO_MIN_TRAIN:
        return AutoIndex(train_features, cfg, add_batch, seed)
    cfg = cfg.resolved(n)
    if cfg.kind == "cells":
        device = torch.device("cuda") if cfg.use_gpu and torch.cuda.is_available() else torch.device("cpu")
        return _cell_index(train_features, cfg, seed, device)
    return _faiss_index(train_features, cfg, add_batch, seed)


class AutoIndex:
    """``auto`` from :data:`AUTO_MIN_TRAIN` features on: the cells, calibrated on the first search's
    queries; when their probes would read more than :data:`AUTO_MAX_PROBED` of the train features
    (features that cluster poorly), an exact faiss index is built and searches instead, since
    reading that much cell by cell is slower than one exact scan. ``chosen`` says which searched
    and ``reason`` why (the k-NN tool reports them)."""

    def __init__(self, train_features, cfg: IndexConfig, add_batch: int, seed: int) -> None:
        self._features, self._add_batch, self._seed = train_features, add_batch, seed
        self._cfg = IndexConfig(**{**cfg.__dict__, "kind": "cells"})
        device = torch.device("cuda") if cfg.use_gpu and torch.cuda.is_available() else torch.device("cpu")
        self.cells: CellIndex = _cell_index(train_features, self._cfg, seed, device)
        self.flat: FeatureIndex | None = None
        self.chosen, self.reason = "cells", "not searched yet"

    @property
    def ntotal(self) -> int:
        return self.cells.ntotal

    @property
    def nbytes(self) -> int:
        return self.cells.nbytes if self.flat is None else self.flat.nbytes

    def probed_share(self, queries, k: int) -> float:
        """The share of the stored rows the calibrated probes read, averaged over the queries'
        calibration sample (cells differ in size: counted in rows, not cells)."""
        c = self.cells
        q = torch.as_tensor(queries).to(c.data.device, torch.float32)
        nprobe = min(c.nprobe or c.calibrate(q, k), c.nlist)
        c.nprobe = nprobe          # the search uses the calibrated value: not calibrated twice
        sample = q[torch.randperm(len(q), generator=torch.Generator().manual_seed(c.seed))[:256].to(q.device)]
        probe = (sample @ c.centroids.T).topk(nprobe, dim=1).indices
        sizes = (c.offsets[1:] - c.offsets[:-1]).double()
        return float(sizes[probe].sum(dim=1).mean() / c.ntotal)

    def search(self, queries, k: int, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """Decided on the first search (its queries calibrate the cells), then kept."""
        if self.reason == "not searched yet":
            share = self.probed_share(queries, k)
            if share > AUTO_MAX_PROBED:
                self.chosen = "flat"
                self.flat = _faiss_index(self._features, IndexConfig(**{**self._cfg.__dict__, "kind": "flat"}),
                                         self._add_batch, self._seed)
            self.reason = (f"the calibrated probes read {share:.1%} of the train features "
                           f"({'more' if self.chosen == 'flat' else 'at most'} than {AUTO_MAX_PROBED:.0%})")
        if self.flat is not None:
            return self.flat.search(queries, k, batch_size)
        return self.cells.search(queries, k, batch_size)

"""k-NN at ImageNet scale: ssl_xcit's indexes against DINO's own k-NN, in the same run.

Data: synthetic clustered features shaped like ImageNet's (1,000 classes in 100 super-classes,
1.28M x 384 train, 50k queries at ``--scale 1``; ``--scale 0.01`` is 1/100 of the work: 128k x 5k).
Class centres lie on the unit sphere, siblings of a super-class close together (cosine ~0.94);
each sample adds anisotropic Gaussian noise (a power-law spectrum whose axes are shared within a
super-class, scaled per class), then is L2-normalised as DINO's features are. Neighbours of a query
mix its class with its siblings, so weighted k-NN is ~79% top-1 at 1/100 (higher at full scale,
with 10x the train samples per class) rather than trivially separable.

Reference: DINO's ``knn_classifier`` (dino/eval_knn.py) as written -- float32 matmul of a chunk of
queries against all train features (DINO cuts the queries into 100 chunks: 500 queries at full scale;
here at least 100, so the 1/100 run is not slowed by 50-query chunks), ``topk``, one-hot votes weighted by ``exp(sim / T)``.
Each ssl_xcit index is timed as index build + search-and-vote (``knn_predict``).

    python benchmarks/knn.py --scale 0.01                 # CPU, quick (a few minutes on 2 cores)
    python benchmarks/knn.py --device cuda                # full scale on one GPU
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ssl_xcit.evaluate.knn import knn_predict  # noqa: E402
from ssl_xcit.evaluate.knn_index import IndexConfig, build_index  # noqa: E402

FULL_TRAIN, FULL_QUERIES, CLASSES, SUPER, DIM = 1_281_167, 50_000, 1000, 100, 384
NOISE, SIBLING_MIX = 0.95, 0.97


# --------------------------------------------------------------------------------------------- data
def clustered_features(n_train: int, n_query: int, classes: int = CLASSES, dim: int = DIM, seed: int = 0,
                       device: str | torch.device = "cpu", noise: float = NOISE, mix: float = SIBLING_MIX,
                       chunk: int = 131072) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train (N, dim), train labels, queries (Q, dim), query labels)``: unit float32 rows, labels
    cycling over the classes (balanced). Deterministic for a seed and device."""
    g = torch.Generator(device=device).manual_seed(seed)
    normal = lambda *shape: torch.randn(*shape, generator=g, device=device)  # noqa: E731
    n_super = max(1, min(SUPER, classes // 10))
    sup = torch.nn.functional.normalize(normal(n_super, dim), dim=1)
    own = torch.nn.functional.normalize(normal(classes, dim), dim=1)
    parent = torch.arange(classes, device=device) % n_super
    centres = torch.nn.functional.normalize(mix * sup[parent] + math.sqrt(1 - mix ** 2) * own, dim=1)
    spectrum = torch.arange(1, dim + 1, device=device, dtype=torch.float32) ** -0.5  # variance ~ 1/j
    axes = torch.argsort(torch.rand(n_super, dim, generator=g, device=device), dim=1)
    scale = spectrum[axes[parent]] * torch.exp(0.3 * normal(classes, dim))
    scale = scale / scale.norm(dim=1, keepdim=True)  # each class: total noise variance 1
    rotation, _ = torch.linalg.qr(normal(dim, dim))

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n, device=device) % classes
        x = torch.empty(n, dim, device=device)
        for s in range(0, n, chunk):
            y = labels[s:s + chunk]
            x[s:s + chunk] = centres[y] + noise * (normal(len(y), dim) * scale[y]) @ rotation
        return torch.nn.functional.normalize(x, dim=1), labels

    return (*sample(n_train), *sample(n_query))


# --------------------------------------------------------------------------------------------- reference
@torch.no_grad()
def dino_knn(train_features, train_labels, test_features, test_labels, k, T, num_classes=CLASSES):
    """DINO's ``knn_classifier`` (eval_knn.py) as written: top-1 in percent, and the neighbour ids."""
    top1, total = 0.0, 0
    num_test_images, num_chunks = test_labels.shape[0], 100
    imgs_per_chunk = max(num_test_images // num_chunks, 100)  # DINO: // num_chunks (50 at 1/100 scale)
    retrieval_one_hot = torch.zeros(k, num_classes, device=train_features.device)
    all_indices = []
    for idx in range(0, num_test_images, imgs_per_chunk):
        features = test_features[idx: min((idx + imgs_per_chunk), num_test_images), :]
        targets = test_labels[idx: min((idx + imgs_per_chunk), num_test_images)]
        batch_size = targets.shape[0]
        similarity = torch.mm(features, train_features.T)
        distances, indices = similarity.topk(k, largest=True, sorted=True)
        candidates = train_labels.view(1, -1).expand(batch_size, -1)
        retrieved_neighbors = torch.gather(candidates, 1, indices)
        retrieval_one_hot.resize_(batch_size * k, num_classes).zero_()
        retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
        distances_transform = distances.clone().div_(T).exp_()
        probs = torch.sum(torch.mul(retrieval_one_hot.view(batch_size, -1, num_classes),
                                    distances_transform.view(batch_size, -1, 1)), 1)
        _, predictions = probs.sort(1, True)
        correct = predictions.eq(targets.data.view(-1, 1))
        top1 = top1 + correct.narrow(1, 0, 1).sum().item()
        total += targets.size(0)
        all_indices.append(indices)
    return top1 * 100.0 / total, torch.cat(all_indices)


# --------------------------------------------------------------------------------------------- runs
def methods(device: str) -> dict[str, IndexConfig]:
    """Every index measured; on a GPU only those that run there (faiss GPU if the build has it)."""
    gpu = device != "cpu"
    out = {"cells (auto nprobe)": IndexConfig(kind="cells", use_gpu=gpu),
           "cells, float16 residuals": IndexConfig(kind="cells", fp16=True, use_gpu=gpu)}
    from ssl_xcit.evaluate.knn_index import faiss_gpu_available
    if not gpu or faiss_gpu_available():
        out = {"faiss flat (exact)": IndexConfig(kind="flat", use_gpu=gpu),
               "faiss flat fp16": IndexConfig(kind="flat", fp16=True, use_gpu=gpu), **out}
    if not gpu:
        out.update({"faiss ivf (CLI defaults)": IndexConfig(kind="ivf", nprobe=32),
                    "faiss hnsw (CLI defaults)": IndexConfig(kind="hnsw")})
    return out


def sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def run(scale: float, device: str, k: int, temperature: float, only: list[str] | None, seed: int,
        repeat: int = 1) -> list[dict]:
    """Prints one table row per method as it is measured: the fastest of ``repeat`` runs each."""
    n_train, n_query = round(FULL_TRAIN * math.sqrt(scale)), round(FULL_QUERIES * math.sqrt(scale))
    t0 = time.perf_counter()
    xt, yt, xq, yq = clustered_features(n_train, n_query, seed=seed, device=device)
    sync(device)
    print(f"data: {n_train} x {DIM} train, {n_query} queries, {CLASSES} classes, k={k}, T={temperature} "
          f"({time.perf_counter() - t0:.1f} s to make)", flush=True)
    ref = math.inf
    for _ in range(repeat):  # the fastest of `repeat` runs: the machine may be shared
        t0 = time.perf_counter()
        exact_top1, exact_ids = dino_knn(xt, yt, xq, yq, k, temperature)
        sync(device)
        ref = min(ref, time.perf_counter() - t0)
    rows = [dict(method="DINO's way (matmul+topk per 100+ queries)", build=0.0, search=ref, top1=exact_top1,
                 recall=1.0, nbytes=xt.numel() * 4, note="")]
    print(_fmt(rows[0], ref, exact_top1), flush=True)
    exact_ids = exact_ids.cpu()
    for name, cfg in methods(device).items():
        if only and not any(o in name for o in only):
            continue
        build, search = math.inf, math.inf
        for _ in range(repeat):
            index = None
            t0 = time.perf_counter()
            index = build_index(xt, cfg, seed=seed)
            sync(device)
            t1 = time.perf_counter()
            preds = knn_predict(index, yt.cpu(), xq, yq.cpu(), ks=(k,), temperature=temperature,
                                num_classes=CLASSES)
            sync(device)
            t2 = time.perf_counter()
            if t2 - t0 < build + search:
                build, search = t1 - t0, t2 - t1
        sims, ids = index.search(xq[:2000], k)  # recall on the first 2,000 queries (search again: cheap)
        found = (torch.from_numpy(ids)[:, :, None] == exact_ids[:2000, None, :]).any(2).float().mean().item()
        note = ""
        if getattr(index, "last_nprobe", None):
            note = f"nlist {index.nlist}, nprobe {index.last_nprobe}"
        rows.append(dict(method=name, build=build, search=search, top1=preds[k].top1_acc, recall=found,
                         nbytes=index.nbytes, note=note))
        print(_fmt(rows[-1], ref, exact_top1), flush=True)
        del index
    return rows


def _fmt(r: dict, ref: float, exact: float) -> str:
    total = r["build"] + r["search"]
    return (f"| {r['method']} | {r['build']:.2f} | {r['search']:.2f} | {total:.2f} | {ref / total:.2f}x | "
            f"{r['top1']:.2f} | {r['top1'] - exact:+.2f} | {r['recall']:.4f} | {r['nbytes'] / 2**20:.0f} MiB | "
            f"{r['note']} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=float, default=None,
                   help="share of the full work (1.28M x 50k); sides scale by its square root "
                        "(default: 1 on cuda, 0.01 on the CPU)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--only", nargs="*", default=None, help="measure only methods whose name holds one of these")
    p.add_argument("--threads", type=int, default=None, help="torch and faiss CPU threads (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1, help="time each method this often, keep the fastest")
    args = p.parse_args(argv)
    problem = ("--device cuda but torch sees no GPU" if args.device == "cuda" and not torch.cuda.is_available()
               else f"--scale must be positive, got {args.scale}" if args.scale is not None and args.scale <= 0
               else f"--k must be positive, got {args.k}" if args.k <= 0
               else f"--temperature must be positive, got {args.temperature}" if args.temperature <= 0 else None)
    if problem:  # a known error: one line, exit 2
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    if args.threads:
        import faiss
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    scale = args.scale if args.scale is not None else (1.0 if args.device == "cuda" else 0.01)
    print(f"# benchmarks/knn.py  scale={scale}  device={args.device}  repeat={args.repeat}  "
          f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}  torch threads "
          f"{torch.get_num_threads()}  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| method | build s | search+vote s | total s | vs DINO | top-1 | vs exact | recall@k | "
          "train features held | notes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    run(scale, args.device, args.k, args.temperature, args.only, args.seed, max(1, args.repeat))


if __name__ == "__main__":
    main()

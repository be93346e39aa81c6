#!/usr/bin/env python
"""``--index auto``'s rule against exact flat and cells, timed on features shaped like real ones
(issue 33): a width, a count, and how well they cluster (``--noise``: the class noise of
benchmarks/knn.py's generator; more noise clusters worse, as a short CPU run's features do).

For each noise level: build + search of faiss flat, of cells, and of auto (which builds the cells,
calibrates them on the queries and searches with cells only when the probes read at most
AUTO_MAX_PROBED of the rows), the share the calibrated probes read, and auto's choice.

    python benchmarks/knn_auto.py --n 100000 --dim 128 --queries 5000 --noise 0.6 0.95 2.0
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.knn import clustered_features  # noqa: E402
from ssl_xcit.evaluate.knn_index import AUTO_MAX_PROBED, IndexConfig, build_index  # noqa: E402


def timed(kind: str, xt, xq, k: int):
    t = time.perf_counter()
    index = build_index(xt, IndexConfig(kind=kind))
    _, ids = index.search(xq, k)
    return time.perf_counter() - t, index, ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=5_000)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--noise", type=float, nargs="+", default=[0.6, 0.95, 2.0])
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for noise in args.noise:
        xt, _, xq, _ = clustered_features(args.n, args.queries, classes=args.classes, dim=args.dim, noise=noise)
        t_flat, _, exact = timed("flat", xt, xq, args.k)
        t_cells, cells, _ = timed("cells", xt, xq, args.k)
        t_auto, auto, ids = timed("auto", xt, xq, args.k)
        share = float(auto.probed_share(xq, args.k)) if hasattr(auto, "probed_share") else None
        same = float((torch.as_tensor(ids) == torch.as_tensor(exact)).double().mean())
        rows.append({"noise": noise, "flat_s": t_flat, "cells_s": t_cells, "auto_s": t_auto,
                     "cells_nprobe": cells.last_nprobe, "nlist": cells.nlist, "probed_share": share,
                     "auto_chose": getattr(auto, "chosen", "flat"), "auto_ids_equal_exact": same})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nN={args.n:,} x {args.dim}, {args.queries:,} queries, {args.classes} classes, k={args.k}, "
          f"{args.threads} thread(s); auto: cells when probes read <= {AUTO_MAX_PROBED:.0%}")
    print("| noise | probed share | flat s | cells s | auto s | auto chose | ids = exact |")
    for r in rows:
        print(f"| {r['noise']} | {r['probed_share']:.1%} | {r['flat_s']:.2f} | {r['cells_s']:.2f} | {r['auto_s']:.2f} "
              f"| {r['auto_chose']} | {r['auto_ids_equal_exact']:.4f} |")


if __name__ == "__main__":
    main()

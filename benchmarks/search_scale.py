"""Search at 100,000 images: one query against a feature export, once its index exists.

The export is synthetic but written by the real exporter (``export_features`` with an identity
"model" over feature vectors): ImageNet-like clustered features (``benchmarks/knn.py``'s
``clustered_features``), ``--n`` x ``--dim`` in ``--dtype``, sharded as a real export. Timed apart:

* building the index (first search: read the export, build, calibrate, save next to the export);
* a later search: open the export, load the saved index and the paths, search one query;
* the search call alone (median of ``--repeat`` single queries);
* the model's embedding of one query image (``--checkpoint``, 224 px), loading the model apart.

    python benchmarks/search_scale.py --out /tmp/synth100k            # CPU, about a minute
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from knn import clustered_features  # noqa: E402

from ssl_xcit.evaluate import export, search  # noqa: E402
from ssl_xcit.evaluate.exported import open_export  # noqa: E402


class Vectors(torch.utils.data.Dataset):
    """Feature vectors posing as images (the identity model returns them as their CLS feature)."""

    def __init__(self, x: torch.Tensor, root: str = "/synthetic") -> None:
        self.x, self.root = x, root
        self.files = [f"img{i:07d}.jpg" for i in range(len(x))]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], -1, i


def synthetic_export(out: Path, n: int, dim: int = 384, dtype: str = "float16", seed: int = 0,
                     x: torch.Tensor | None = None) -> torch.Tensor:
    """Write (or keep) an export of ``n`` clustered unit features; returns them (float32)."""
    if x is None:
        x, _, _, _ = clustered_features(n, 0, dim=dim, seed=seed)
    if not (out / export.MANIFEST).is_file() or not json.loads((out / export.MANIFEST).read_text()).get("complete"):
        export.export_features(nn.Identity().eval(), Vectors(x), out, shard_size=10000, dtype=dtype,
                               batch_size=8192, num_workers=0, progress=False, source={"synthetic": True})
    return x


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def embedding_time(checkpoint: str, repeat: int = 5) -> dict:
    from PIL import Image
    from ssl_xcit.evaluate.backbone import backbone_outputs, load_frozen_backbone
    from ssl_xcit.evaluate.datasets import eval_transform
    t = time.perf_counter()
    model = load_frozen_backbone(checkpoint, "xcit_nano_12_p8" if not Path(checkpoint).is_file() else None)
    load_s = time.perf_counter() - t
    img = eval_transform(224)(Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), np.uint8)))
    ms = _median_ms(lambda: backbone_outputs(model, img[None], ("cls",)), repeat)
    return {"model_load_s": round(load_s, 2), "embed_one_224px_ms": round(ms, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="where the synthetic export goes (kept for reuse)")
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--kind", default="auto", choices=("auto", "flat", "cells"))
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--checkpoint", default="xcit_nano_12_p8", help="model whose query embedding is timed")
    args = p.parse_args()
    out = Path(args.out)
    x = synthetic_export(out, args.n, args.dim, args.dtype)
    view = open_export(out)
    t = time.perf_counter()
    built = search.load_or_build_index(view, "cls", args.kind, rebuild=True)
    build_s = time.perf_counter() - t
    q = (x[7:8] + 0.02 * torch.randn(1, args.dim)).numpy()

    def later_search():
        v = open_export(out)
        loaded = search.load_or_build_index(v, "cls", args.kind)
        assert not loaded.built
        paths = v.paths()
        s, r = search.search_features(loaded.index, q, 10)
        return paths[r[0, 0]]

    t = time.perf_counter()
    top = later_search()
    first_later_s = time.perf_counter() - t
    search_ms = _median_ms(lambda: search.search_features(built.index, q, 10), args.repeat)
    res = {"n": args.n, "dim": args.dim, "dtype": args.dtype, "index": built.kind,
           "nprobe": getattr(built.index, "nprobe", None), "build_index_s": round(build_s, 2),
           "later_search_open_load_search_s": round(first_later_s, 3),
           "later_search_median_s": round(_median_ms(later_search, 3) / 1000, 3),
           "search_one_query_ms": round(search_ms, 2), "top1_is_planted_row": top.endswith("img0000007.jpg"),
           **embedding_time(args.checkpoint)}
    print(json.dumps(res))


if __name__ == "__main__":
    main()

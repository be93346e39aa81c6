#!/usr/bin/env python
"""The quickstart's final k-NN image work, before and after decoding once (issue 33), in one process.

Times the features of two backbones (XCiT-nano/8 from seeds 0 and 1, as the quickstart's trained
teacher and random start) on the same evenly spread train + val images of each data set, the two
ways, interleaved so a changing load hits both: ``before``, one pass per backbone, every image
decoded in full each time (the quickstart until issue 33); ``after``, one pass for both with JPEG
draft decoding at the crop (``knn_predictions_each``'s path). Prints seconds per way and data set.

    python benchmarks/quickstart_knn_decode.py --data /work/data/cifar10 /work/data/imagenette --images 2000 500
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def features_time(root: Path, n_train: int, n_val: int, after: bool, crop: int = 32, workers: int = 2) -> float:
    from ssl_xcit.data.sources import open_image_dataset
    from ssl_xcit.data.subsets import evenly_spread
    from ssl_xcit.evaluate.backbone import load_frozen_backbone
    from ssl_xcit.evaluate.datasets import eval_transform
    from ssl_xcit.evaluate.features import extract_features, extract_features_each
    models = [load_frozen_backbone("xcit_nano_12_p8", seed=s) for s in (0, 1)]
    t0 = time.perf_counter()
    for split, n in (("train", n_train), ("val", n_val)):
        ds = open_image_dataset(root / split, eval_transform(crop, resize=crop), progress=False,
                                draft_side=crop if after else None)
        ds.select(evenly_spread(len(ds), n))
        if after:
            extract_features_each(models, ds, batch_size=256, num_workers=workers, progress=False)
        else:
            for m in models:
                extract_features(m, ds, batch_size=256, num_workers=workers, progress=False)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--images", type=int, nargs=2, default=(2000, 500), metavar=("TRAIN", "VAL"))
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    times: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for data in args.data:
            for after in (False, True):
                key = f"{Path(data).name} {'after' if after else 'before'}"
                times.setdefault(key, []).append(features_time(Path(data), *args.images, after=after))
                print(key, f"{times[key][-1]:.1f} s", flush=True)
    print(json.dumps({k: [round(v, 1) for v in vs] for k, vs in times.items()}))


if __name__ == "__main__":
    main()

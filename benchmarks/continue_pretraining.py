#!/usr/bin/env python
"""Continuing DINO from pretrained weights: what each way of continuing keeps and learns.

The start is a trained DINO run (default: the quickstart's, ``runs/quickstart/train/checkpoint.pth``:
XCiT-nano/8 trained 400 steps on CIFAR-10 at 32 px). Each arm continues it for ``--steps`` optimizer
steps (the quickstart's 400 by default: its CPU budget) on the images of a setting, once per seed;
then DINO's weighted k-NN (k=20, T=0.07) scores the start and every continued teacher on the
**original** domain (CIFAR-10) and the **new** one (Imagenette), on the same queries (paired test).

Settings: ``same`` continues on CIFAR-10 train (12,800 images, as the quickstart); ``new`` on
Imagenette train (9,469 photos of 10 ImageNet classes, read at the same 32 px).

Arms (every arm: the quickstart's budget -- batch 32, two 32-px global crops, no local crops, fp32):

* ``naive``: what users of the official code do (dino#207, #284): the file's backbones into student
  and teacher, DINO's values as written (65,536 normalised prototypes without BatchNorm, so a fresh
  head and a zero centre, teacher momentum 0.996 -> 1, lr 5e-4 per 256 images, drop path 0.1, no
  KoLeo; DINO's 10 warm-up epochs and frozen last layer set to 0, as ``small_data.py`` does).
* ``scratch``: ``recipe: auto`` as for a new run on these images (momentum 0.975, the quickstart's
  lr, KoLeo), the teacher's backbone in both networks, a fresh head and a zero centre.
* ``ours``: ``pretrained_weights=`` with ``recipe: auto``: the file's heads and centre, and the
  continuing choices of ``ssl_xcit.train.recipe.continuing``.
* ``ours_backbone``: the same from the teacher's backbone alone (a file without head or centre,
  as published backbones are): a fresh head, warmed up with the backbone frozen.
* ``from_random``: for scale, what the same budget gives from a random XCiT-nano/8 (the quickstart's
  recipe on the setting's images), without any pretrained weights.

    python benchmarks/continue_pretraining.py --seeds 0 1 2 --settings same new --arms naive ours
    python benchmarks/continue_pretraining.py --arms ours momentum_teacher=0.99    # an override for every arm
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"

BUDGET = ["local_crops_number=0", "augment=gpu", "num_workers=1", "batch_size_per_gpu=32", "precision=fp32",
          "global_crops_size=32", "local_crops_size=16", "report=false", "tensorboard=false"]
ARMS = {
    "naive": ["recipe=off", "out_dim=65536", "norm_last_layer=true", "use_bn_in_head=false",
              "head_hidden_dim=2048", "momentum_teacher=0.996", "final_momentum_teacher=1.0",
              "drop_path_rate=0.1", "warmup_epochs=0", "freeze_last_layer=0", "lr=0.0005", "min_lr=1e-6"],
    "scratch": ["recipe=auto", "momentum_teacher=0.975", "backbone_lr_scale=1.0", "freeze_backbone_steps=0",
                "center_init=zero", "lr=0.004", "min_lr=1e-4"],
    "ours": ["recipe=auto"],
    "ours_backbone": ["recipe=auto"],
    "from_random": ["recipe=auto", "arch=xcit_nano_12_p8"],
}
SETTINGS = {"same": "cifar", "new": "imagenette"}


def unpack(source: Path, cache: Path, name: str) -> Path:
    """A data set root with train/ and val/: ``source`` itself, or its archive(s) unpacked once."""
    if source.is_dir() and (source / "train").is_dir():
        return source
    dest = cache / name
    if not (dest / ".complete").exists():
        archives = sorted(source.glob("*.tar")) if source.is_dir() else [source]
        dest.mkdir(parents=True, exist_ok=True)
        for archive in archives:
            with tarfile.open(archive) as tar:
                tar.extractall(dest, filter="data")
        (dest / ".complete").touch()
    return next(p for p in [dest, *dest.iterdir()] if p.is_dir() and (p / "train").is_dir())


def backbone_only(start: Path, out: Path) -> Path:
    """The start's teacher backbone alone, as a safetensors file in timm's names (no head, no centre)."""
    from safetensors.torch import save_file
    from ssl_xcit.models.checkpoints import load_state_source
    path = out / "start_backbone.safetensors"
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        weights = load_state_source(start, checkpoint_key="teacher").state_dict
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    return path


def continue_run(arm: str, setting: str, seed: int, args, roots: dict, out: Path) -> Path:
    """Train one arm; returns its checkpoint (an existing finished run is reused)."""
    from ssl_xcit.train.config import load_config
    from ssl_xcit.train.loop import train
    ckpt = out / "checkpoint.pth"
    if (out / "log.jsonl").exists() and '"finished"' in (out / "log.jsonl").read_text():
        return ckpt
    weights = backbone_only(args.start, args.out) if arm in ("ours_backbone", "scratch") else args.start
    root = roots[SETTINGS[setting]]
    images = args.cifar_images if setting == "same" else 0
    steps_per_epoch = (images or sum(1 for _ in (root / "train").rglob("*.*"))) // 32
    overrides = [f"data_path={root / 'train'}", f"output_dir={out}", f"seed={seed}", f"max_steps={args.steps}",
                 f"max_images={images}", f"epochs={-(-args.steps // steps_per_epoch)}",
                 *([] if arm == "from_random" else [f"pretrained_weights={weights}"]), *BUDGET, *ARMS[arm],
                 *args.overrides]
    t0 = time.perf_counter()
    train(load_config(None, overrides))
    print(f"[continue] {arm} {setting} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    return ckpt


def knn(checkpoint: str, root: Path, args):
    import torch
    from ssl_xcit.commands.quickstart import knn_predictions
    preds, val_y = knn_predictions(checkpoint, root, args.crop, args.knn_train_images, args.knn_val_images, [20],
                                   torch.device("cpu"), num_workers=1)
    return preds[20], val_y


def evaluate(checkpoint: Path, roots: dict, args, cache: dict) -> dict:
    """k-NN top-1 on both domains, with the per-query hits for the paired test (cached per file)."""
    key = str(checkpoint)
    if key not in cache:
        cache[key] = {}
        for domain, root in roots.items():
            pred, val_y = knn(key, root, args)
            cache[key][domain] = {"top1": pred.top1_acc, "hits": (pred.top5[:, 0] == val_y).tolist()}
    return cache[key]


def table(results: dict, start: dict, args) -> str:
    from ssl_xcit.commands.quickstart import paired_gain
    import torch
    lines = [f"k-NN top-1 (k=20, {args.knn_train_images} train / {args.knn_val_images} val images per domain, "
             f"{args.crop} px); continued {args.steps} steps; paired McNemar p of the change from the start",
             f"{'setting':<8} {'arm':<14} {'seed':>4} {'CIFAR-10':>9} {'change':>7} {'p':>8} "
             f"{'Imagenette':>10} {'change':>7} {'p':>8}",
             f"{'':<8} {'start':<14} {'':>4} {start['cifar']['top1']:>9.2f} {'':>7} {'':>8} "
             f"{start['imagenette']['top1']:>10.2f}"]
    for (setting, arm, seed), res in sorted(results.items()):
        cells = []
        for domain in ("cifar", "imagenette"):
            test = paired_gain(torch.tensor(res[domain]["hits"]), torch.tensor(start[domain]["hits"]))
            p = test["p_value"] if test["gain"] >= 0 else paired_gain(torch.tensor(start[domain]["hits"]),
                                                                      torch.tensor(res[domain]["hits"]))["p_value"]
            cells.append(f"{res[domain]['top1']:>9.2f} {test['gain']:>+7.2f} {p:>8.1g}")
        lines.append(f"{setting:<8} {arm:<14} {seed:>4} {cells[0]} {cells[1]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--start", type=Path, default=REPO / "runs" / "quickstart" / "train" / "checkpoint.pth")
    p.add_argument("--cifar", type=Path, default=SHARED / "cifar10.tar.gz")
    p.add_argument("--imagenette", type=Path, default=SHARED / "imagenette")
    p.add_argument("--settings", nargs="+", default=["same", "new"], choices=list(SETTINGS))
    p.add_argument("--arms", nargs="+", default=["naive", "ours"], choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--cifar-images", type=int, default=12800)
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--knn-train-images", type=int, default=10000)
    p.add_argument("--knn-val-images", type=int, default=2000)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "continue")
    p.add_argument("--cache", type=Path, default=Path("/tmp/ssl_xcit_bench_data"))
    p.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every arm's run")
    args = p.parse_args(argv)
    if not args.start.is_file():
        sys.exit(f"{args.start} not found: run python launch/quickstart.py first, or pass --start")
    args.start, args.out = args.start.resolve(), args.out.resolve()
    roots = {"cifar": unpack(args.cifar, args.cache, "cifar10"), "imagenette": unpack(args.imagenette, args.cache,
                                                                                      "imagenette")}
    tag = "_".join(o.replace("=", "-") for o in args.overrides)
    cache_file = args.out / "knn_cache.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    start = evaluate(args.start, roots, args, cache)
    results = {}
    for setting in args.settings:
        for arm in args.arms:
            for seed in args.seeds:
                out = args.out / f"{setting}_{arm}{'_' + tag if tag else ''}_s{seed}"
                ckpt = continue_run(arm, setting, seed, args, roots, out)
                results[(setting, arm + (f" {tag}" if tag else ""), seed)] = evaluate(ckpt, roots, args, cache)
                cache_file.write_text(json.dumps(cache))
    print(table(results, start, args), flush=True)


if __name__ == "__main__":
    main()

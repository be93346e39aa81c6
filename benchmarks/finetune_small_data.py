#!/usr/bin/env python
"""Does DINO's start help fine-tuning? The same recipe from the DINO teacher and from random
weights, at equal steps, with all labels and with a tenth of them, on several seeds; and the linear
probe of the same teacher.

Each run is ``ssl_xcit.finetune`` with ``recipe: auto`` (DeiT's pieces from timm: RandAugment,
random erasing, mixup/cutmix, label smoothing, AdamW with layer decay, drop path), the same seed for
both starts, so both see the same few-label subset, crops and mixes. Each fine-tuned model is then
scored on every val image, and the two starts are compared on the same images (exact one-sided
McNemar test). The linear probe: ``eval_linear``'s cached mode (a grid of lr x weight decay on the
frozen teacher's centre-crop features, chosen on a held-out tenth of the labelled images), on the
same labelled subset.

    python benchmarks/finetune_small_data.py --data ../shared/data/cifar10.tar.gz --seeds 0 1 2
    python benchmarks/finetune_small_data.py --data ../shared/data/imagenette --input-size 64 --steps 600 \\
        --name imagenette
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"


def finetune(start: str, fraction: float, seed: int, args, root: Path, out: Path) -> Path:
    """One fine-tuning run (reused when finished); returns its checkpoint."""
    from ssl_xcit.finetune.config import FinetuneConfig
    from ssl_xcit.finetune.loop import train
    from ssl_xcit.train.config import load_config
    if (out / "log.jsonl").exists() and '"finished"' in (out / "log.jsonl").read_text():
        return out / "checkpoint.pth"
    images = sum(1 for p in (root / "train").rglob("*") if p.is_file())
    steps_per_epoch = max(1, int(images * fraction) // args.batch)
    weights = [f"pretrained_weights={args.start}"] if start == "dino" else [f"arch={args.arch}"]
    overrides = [f"data_path={root}", f"output_dir={out}", f"seed={seed}", f"train_fraction={fraction}",
                 *([] if args.steps_only else [f"epochs={-(-args.steps // steps_per_epoch)}"]), f"max_steps={args.steps}",
                 f"batch_size_per_gpu={args.batch}", f"input_size={args.input_size}", "precision=fp32",
                 "num_workers=1", "eval_every_epochs=0", "max_val_images=0", "tensorboard=false", "report=false",
                 "log_every_steps=50", *weights, *args.overrides]
    t0 = time.perf_counter()
    train(load_config(None, overrides, schema=FinetuneConfig))
    print(f"[finetune] {start} labels {fraction:g} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out / "checkpoint.pth"


def hits(checkpoint: Path, root: Path, args) -> list[bool]:
    """Per val image: is the fine-tuned model's top-1 right (every val image, the model's own transform)."""
    import torch
    from torch.utils.data import DataLoader
    from ssl_xcit.data.folders import ImageFiles, collate_skip_corrupt
    from ssl_xcit.evaluate.datasets import transform_for
    from ssl_xcit.models import build_model
    from ssl_xcit.models.checkpoints import load_into, load_state_source
    weights = load_state_source(checkpoint)
    model = build_model(weights.arch, num_classes=int(weights.state_dict["head.weight"].shape[0]),
                        img_size=weights.img_size)
    load_into(model, weights)
    model.eval()
    loader = DataLoader(ImageFiles(root / "val", transform=transform_for(model.data_config)), batch_size=256,
                        num_workers=1, collate_fn=collate_skip_corrupt)
    out: list[bool] = []
    with torch.no_grad():
        for batch in loader:
            out += (model(batch.images).argmax(1) == batch.labels).tolist()
    return out


def linear_probe(fraction: float, seed: int, args, root: Path, cache: dict) -> float:
    """eval_linear's cached mode on the teacher's features, trained on the same labelled subset."""
    import torch
    from ssl_xcit.data.sources import open_image_dataset
    from ssl_xcit.evaluate.backbone import load_frozen_backbone
    from ssl_xcit.evaluate.datasets import eval_transform
    from ssl_xcit.evaluate.features import extract_features
    from ssl_xcit.evaluate.linear import CachedConfig, cached_linear_eval
    from ssl_xcit.finetune.data import few_labels
    if "features" not in cache:
        model = load_frozen_backbone(str(args.start), device=torch.device("cpu"))
        transform = eval_transform(args.input_size, resize=args.input_size)
        cache["features"] = {split: extract_features(model, open_image_dataset(root / split, transform=transform,
                                                                                progress=False),
                                                     batch_size=256, num_workers=1, desc=f"linear probe: {split}")
                             for split in ("train", "val")}
    (tx, ty), (vx, vy) = cache["features"]["train"], cache["features"]["val"]
    keep = torch.as_tensor(few_labels(ty.numpy(), fraction=fraction, seed=seed))
    result = cached_linear_eval(tx[keep], ty[keep], vx, vy, int(ty.max()) + 1, CachedConfig(seed=seed))
    return result["top1"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=SHARED / "cifar10.tar.gz")
    p.add_argument("--start", type=Path, default=REPO / "runs" / "quickstart" / "train" / "checkpoint.pth")
    p.add_argument("--arch", default="xcit_nano_12_p8", help="the random start's arch (the DINO start's own)")
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.1])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--name", default="cifar10")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "finetune_bench")
    p.add_argument("--cache", type=Path, default=Path("/tmp/ssl_xcit_bench_data"))
    p.add_argument("--no-linear", action="store_true")
    p.add_argument("--steps-only", action="store_true",
                   help="give the length as max_steps alone (a user's '250 steps'; epochs stays at its default)")
    p.add_argument("--tag", default="", help="appended to the run folders (e.g. a recipe variant's name)")
    p.add_argument("--starts", nargs="+", default=["dino", "random"], choices=["dino", "random"])
    p.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every fine-tuning run")
    args = p.parse_args(argv)
    if not args.start.is_file():
        sys.exit(f"{args.start} not found: run python launch/quickstart.py first, or pass --start")
    from benchmarks.continue_pretraining import unpack
    from ssl_xcit.commands.quickstart import paired_gain
    import torch
    root = unpack(args.data, args.cache, args.name)
    args.start = args.start.resolve()
    rows, features = [], {}
    for fraction in args.fractions:
        for seed in args.seeds:
            tag = f"{args.name}_{args.input_size}px_{args.steps}steps_labels{fraction:g}_s{seed}{args.tag}"
            res = {s: hits(finetune(s, fraction, seed, args, root, args.out / f"{tag}_{s}"), root, args)
                   for s in args.starts}
            if len(res) < 2:
                print(json.dumps({s: 100 * sum(h) / len(h) for s, h in res.items()}), flush=True)
                continue
            test = paired_gain(torch.tensor(res["dino"]), torch.tensor(res["random"]))
            probe = None if args.no_linear else linear_probe(fraction, seed, args, root, features)
            rows.append({"fraction": fraction, "seed": seed, "dino": 100 * sum(res["dino"]) / len(res["dino"]),
                         "random": 100 * sum(res["random"]) / len(res["random"]), "gain": test["gain"],
                         "p": test["p_value"], "linear_probe": probe, "val_images": len(res["dino"])})
            print(json.dumps(rows[-1]), flush=True)
    if not rows:    # one start only (--starts): its top-1s are printed above, nothing to compare
        return
    print(f"\n{args.name} at {args.input_size} px, {args.steps} steps of batch {args.batch}: top-1 on "
          f"{rows[0]['val_images']} val images")
    print(f"{'labels':>7} {'seed':>4} {'from DINO':>10} {'from random':>12} {'gain':>7} {'McNemar p':>10} "
          f"{'linear probe':>13}")
    for r in rows:
        probe = f"{r['linear_probe']:.2f}" if r["linear_probe"] is not None else "-"
        print(f"{r['fraction']:>7.0%} {r['seed']:>4} {r['dino']:>10.2f} {r['random']:>12.2f} {r['gain']:>+7.2f} "
              f"{r['p']:>10.2g} {probe:>13}")
    (args.out / f"{args.name}_{args.input_size}px_{args.steps}steps.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

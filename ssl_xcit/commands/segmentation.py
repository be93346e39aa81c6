"""``eval/eval_segmentation.py``: linear semantic-segmentation probe of a frozen backbone's patch
features (DINOv2's linear protocol), scored in mIoU. The parser imports no torch."""
from __future__ import annotations

import argparse
from pathlib import Path

from ssl_xcit.cli import ArgumentParser
from ssl_xcit.commands import options

PROG = "eval_segmentation.py"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description="Linear segmentation probe (BatchNorm + 1x1 conv on frozen patch "
                                              "features, DINOv2's linear protocol), scored in mIoU")
    options.add_backbone_args(p)
    options.add_runtime_args(p)
    g = p.add_argument_group("segmentation probe")
    g.add_argument("--data-path", "--data_path", required=True,
                   help="train/ and val/ folders each with images/ and masks/ (PNG class indices, 255 ignored), "
                        "or a DAVIS folder (foreground/background, split by sequence)")
    g.add_argument("--n-blocks", type=int, default=1,
                   help="1: the final normed patch tokens; n: the last n XCA blocks, normed, concatenated ('+ms')")
    g.add_argument("--image-size", type=int, nargs="+", default=[224], metavar="N",
                   help="the short side (the long side in proportion) or H W; rounded down to the patch")
    g.add_argument("--num-classes", type=int, default=None,
                   help="classes (default: largest mask index of the data + 1; DAVIS: 2)")
    g.add_argument("--steps", type=int, default=1000, help="training steps of the head")
    g.add_argument("--batch-size", type=int, default=16, help="feature maps per step")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (decayed linearly to 0)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    g.add_argument("--class-weights", choices=("none", "balanced"), default="none",
                   help="none: plain cross-entropy (DINOv2); balanced: each class weighted by 1 / its pixel share "
                        "of the train masks, so a small foreground is not learnt away")
    g.add_argument("--train-sequences", nargs="+", default=None, help="DAVIS: training sequences")
    g.add_argument("--val-sequences", nargs="+", default=None,
                   help="DAVIS: validation sequences (default: the second half of the list; the first half trains)")
    g.add_argument("--num-threads", type=int, default=None, help="CPU threads (default: torch's)")
    return p


def check_args(args: argparse.Namespace) -> None:
    for name in ("n_blocks", "num_classes", "steps", "batch_size", "lr", "num_threads"):
        options.check_positive(getattr(args, name), "--" + name.replace("_", "-"))
    options.check_non_negative(args.weight_decay, "--weight-decay")
    if len(args.image_size) not in (1, 2) or min(args.image_size) <= 0:
        raise options.EvalInputError(f"--image-size takes one positive size or two (H W), got "
                                     f"{' '.join(map(str, args.image_size))}")
    options.check_sources(args, ())


def main(argv: list[str] | None = None, prog: str = PROG) -> dict:
    args = build_parser(prog).parse_args(argv)
    check_args(args)
    return options.in_parser_words(build_parser(prog), args, lambda: _run(args))


def _run(args: argparse.Namespace) -> dict:
    from ssl_xcit.atomic import check_writable
    from ssl_xcit.evaluate import backbone, runtime
    from ssl_xcit.evaluate import segmentation as seg
    out = Path(args.output_dir) if args.output_dir else runtime.default_output_dir(args.checkpoint) / "segmentation"
    check_writable(out)
    seg.split_pairs(args.data_path, args.train_sequences, args.val_sequences)   # bad data: one line, before the model
    env = runtime.setup_env(args.device, args.seed)
    if args.num_threads:
        import torch
        torch.set_num_threads(args.num_threads)
    model = backbone.load_frozen_backbone(args.checkpoint, args.arch, args.checkpoint_key, env.device, seed=args.seed)
    settings = seg.ProbeSettings(n_blocks=args.n_blocks, image_size=tuple(args.image_size),
                                 num_classes=args.num_classes, steps=args.steps, batch_size=args.batch_size,
                                 lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
                                 class_weights=args.class_weights)
    source = {"checkpoint": str(args.checkpoint), "arch": getattr(model, "arch", None),
              "checkpoint_key": args.checkpoint_key, "seed": args.seed}
    res = seg.evaluate_segmentation_probe(model, args.data_path, out, settings, args.train_sequences,
                                          args.val_sequences, env.device, progress=not args.no_progress,
                                          source=source)
    per = ", ".join("-" if v is None else f"{v:.3f}" for v in res["per_class_IoU"])
    print(f"mIoU {res['mIoU']:.4f} (per class: {per}) on {len(res['val_images'])} val images, "
          f"{res['seconds']['total']:.0f} s; {out / seg.RESULT_FILE}")
    return res

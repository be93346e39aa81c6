"""``eval/eval_video_segmentation.py``: DAVIS video object segmentation by label propagation (DINO's
protocol) from a frozen backbone's patch features, scored in J&F.

DINO's command line runs as pasted (``--pretrained_weights``, ``--arch``, ``--patch_size``,
``--checkpoint_key``, ``--output_dir``, ``--data_path``, ``--n_last_frames``,
``--size_mask_neighborhood``, ``--topk``; ``--bs`` is accepted and unused, as in DINO's script).
The parser imports no torch: ``--help`` and bad input answer at once.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ssl_xcit.cli import ArgumentParser
from ssl_xcit.commands import options

PROG = "eval_video_segmentation.py"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description="DAVIS video object segmentation by label propagation (DINO's "
                                              "protocol), scored in J&F")
    options.add_backbone_args(p)
    options.add_runtime_args(p)
    g = p.add_argument_group("video segmentation")
    g.add_argument("--data-path", "--data_path", required=True,
                   help="DAVIS-2017-layout folder: JPEGImages/480p/<seq>/, Annotations/480p/<seq>/, "
                        "ImageSets/2017/val.txt (or the folder holding DAVIS/)")
    g.add_argument("--n-last-frames", "--n_last_frames", type=int, default=7,
                   help="context: the first frame and this many frames before the target")
    g.add_argument("--size-mask-neighborhood", "--size_mask_neighborhood", type=int, default=12,
                   help="sources within this many patches of the target (0: the whole frame)")
    g.add_argument("--topk", type=int, default=5, help="labels of the k most similar sources")
    g.add_argument("--temperature", type=float, default=0.1, help="similarity softmax temperature (DINO: 0.1)")
    g.add_argument("--scale-size", "--scale_size", type=int, nargs="+", default=[480], metavar="N",
                   help="frame size: the short side (the long side in proportion, floored to a multiple of 64, "
                        "as DINO), or H W; a side not divisible by the patch is rounded down, with a note")
    g.add_argument("--features", default=None,
                   help="patch features: 'final' (final normed patch tokens, DINO's choice) or an XCA block index, "
                        "negative from the end (default: -3, the third-last block, block 9 of 12: measured best "
                        "on DAVIS, benchmarks/RESULTS.md)")
    g.add_argument("--sequences", nargs="+", default=None, help="these sequences only (default: the split's)")
    g.add_argument("--max-frames", type=int, default=None, help="the first N frames of each sequence only")
    g.add_argument("--tile", type=int, default=8, help="target patches per tile side (memory vs speed)")
    g.add_argument("--num-threads", type=int, default=None,
                   help="CPU threads per op (default: half the cores: features of the next frame are computed "
                        "on the other half while this one is propagated)")
    g.add_argument("--bs", type=int, default=None, help="DINO's: accepted and unused (frames go one by one)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Input checks that need no torch (numbers first, then paths)."""
    for name in ("topk", "tile", "max_frames", "temperature", "num_threads"):
        options.check_positive(getattr(args, name), "--" + name.replace("_", "-"))
    for name in ("n_last_frames", "size_mask_neighborhood"):
        options.check_non_negative(getattr(args, name), "--" + name.replace("_", "-"))
    if len(args.scale_size) not in (1, 2) or min(args.scale_size) <= 0:
        raise options.EvalInputError(f"--scale-size takes one positive size (the short side) or two (H W), "
                                     f"got {' '.join(map(str, args.scale_size))}")
    if args.features is not None and args.features != "final" and not args.features.lstrip("-").isdigit():
        raise options.EvalInputError(f"--features {args.features!r}: give 'final' or an XCA block index")
    options.check_sources(args, ())


def main(argv: list[str] | None = None, prog: str = PROG) -> dict:
    args = build_parser(prog).parse_args(argv)
    check_args(args)
    return options.in_parser_words(build_parser(prog), args, lambda: _run(args))


def _run(args: argparse.Namespace) -> dict:
    from ssl_xcit.atomic import check_writable
    from ssl_xcit.evaluate import backbone, runtime
    from ssl_xcit.evaluate import video_segmentation as vs
    out = Path(args.output_dir) if args.output_dir else runtime.default_output_dir(args.checkpoint) / "video_segmentation"
    check_writable(out)
    vs.davis_sequences(args.data_path, names=args.sequences)     # a bad folder: one line before the model loads
    env = runtime.setup_env(args.device, args.seed)
    if env.device.type == "cpu":
        import torch
        torch.set_num_threads(args.num_threads or max(1, (os.cpu_count() or 2) // 2))
    model = backbone.load_frozen_backbone(args.checkpoint, args.arch, args.checkpoint_key, env.device, seed=args.seed)
    settings = vs.PropagationSettings(
        n_last_frames=args.n_last_frames, size_mask_neighborhood=args.size_mask_neighborhood, topk=args.topk,
        temperature=args.temperature, scale_size=tuple(args.scale_size), tile=args.tile, max_frames=args.max_frames,
        features=args.features or vs.DEFAULT_FEATURES)
    source = {"checkpoint": str(args.checkpoint), "arch": getattr(model, "arch", None),
              "checkpoint_key": args.checkpoint_key, "seed": args.seed}
    result = vs.evaluate_video_segmentation(model, args.data_path, out, settings, args.sequences, env.device,
                                            progress=not args.no_progress, source=source)
    for name, s in result["sequences"].items():
        print(f"{name:24s} J {s['J']:.3f}  F {s['F']:.3f}  J&F {s['J&F']:.3f}")
    print(f"J&F-Mean {result['J&F-Mean']:.4f} (J {result['J-Mean']:.4f}, F {result['F-Mean']:.4f}) over "
          f"{len(result['sequences'])} sequences, {result['seconds']['total']:.0f} s; "
          f"{out / vs.RESULT_FILE}")
    return result

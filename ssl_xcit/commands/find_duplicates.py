"""``eval/find_duplicates.py`` / ``ssl-xcit-find-duplicates``: near-duplicate images of a feature export.

The parser is torch-free; the work is :func:`ssl_xcit.evaluate.duplicates.find_duplicates`.
"""
from __future__ import annotations

import math
from pathlib import Path

from ssl_xcit import cli
from ssl_xcit.commands.search import HINTS as EXPORT_HINTS
from ssl_xcit.errors import UserError

PROG = "eval/find_duplicates.py"
HINTS = {**EXPORT_HINTS, "threshold": "give --threshold in [-1, 1] (the histogram this command prints helps choose)",
         "top_pairs": "give --top-pairs N with N >= 1", "keep": "give --keep first or --keep largest"}


def build_parser(prog: str = PROG) -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog=prog, description="Find near-duplicate images in a feature export: pairs above a "
                           "cosine threshold grouped into connected components (JSON, CSV, a thumbnail page). "
                           "Nothing is deleted; --keep writes the list of files a cleaned data set keeps.")
    p.add_argument("--features", required=True, help="a folder written by eval/export_features.py")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--threshold", type=float, default=None,
                     help="cosine similarity in [-1, 1] above which two images are duplicates. To choose it, run "
                          "once with --top-pairs 100 and look at the histogram printed and in histogram.png: copies "
                          "(exact copies, resized, re-encoded) form a second mode near 1, apart from the bulk of "
                          "nearest-neighbour scores (the x axis is logarithmic in 1 - cosine); put the threshold in "
                          "the valley between them (0.993 for the small DINO teacher of benchmarks/RESULTS.md)")
    how.add_argument("--top-pairs", type=int, default=None, help="instead of a threshold: the N most similar pairs")
    p.add_argument("--descriptor", default="cls", choices=("cls", "cls_gem"),
                   help="cls, or DINO's copy-detection descriptor cls_gem (needs an export made with --patch-tokens)")
    p.add_argument("--keep", default=None, choices=("first", "largest"),
                   help="write keep.txt, the files a cleaned data set keeps: per group the first in the export's "
                        "order, or the largest (pixels, then bytes); never deletes anything")
    p.add_argument("--index", default="auto", choices=("auto", "flat", "cells"),
                   help="auto: exact below 100,000 images, the k-NN cells index (calibrated nprobe) above")
    p.add_argument("--out", default=None, help="where results go (default: FEATURES/duplicates)")
    p.add_argument("--no-html", action="store_true", help="no thumbnail page")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None, prog: str = PROG) -> dict:
    args = build_parser(prog).parse_args(argv)
    if args.threshold is not None and not (math.isfinite(args.threshold) and -1 <= args.threshold <= 1):
        raise cli.UsageError(f"--threshold is a cosine similarity in [-1, 1]; got {args.threshold}")
    if args.top_pairs is not None and args.top_pairs < 1:
        raise cli.UsageError(f"--top-pairs must be >= 1, got {args.top_pairs}")
    from ssl_xcit.atomic import check_writable
    from ssl_xcit.evaluate import duplicates
    out = Path(args.out) if args.out else Path(args.features).expanduser() / "duplicates"
    try:
        check_writable(out)
        result = duplicates.find_duplicates(args.features, args.threshold, args.top_pairs, args.descriptor,
                                            args.index, args.keep, progress=not args.no_progress)
    except UserError as err:
        raise cli.own_words(err, HINTS, cli.flags_of(build_parser(prog)))
    written = duplicates.write_duplicates(result, out, html_page=not args.no_html)
    print(duplicates.text_histogram(result["histogram"]))
    t = result["timing"]
    print(f"{result['n_pairs']} pair(s) in {result['n_groups']} group(s) ({result['n_in_groups']} images) among "
          f"{result['images']}; {result['method']}; pairs found in {t['pairs_s']:.1f} s")
    if "kept" in result:
        print(f"a cleaned set keeps {len(result['kept'])} of {result['images']} images: {written['keep']}")
    print("results: " + ", ".join(str(p) for p in written.values()))
    return result

"""``eval/report.py OUTPUT_DIR``: a run's report page (HTML + PNGs).

The parser is torch-free; the work is :func:`ssl_xcit.evaluate.report.write_report` (the report module
loads torch only for the attention maps).
"""
from __future__ import annotations

from pathlib import Path

from ssl_xcit import cli

PROG = "report.py"


def build_parser(prog: str = PROG) -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog=prog, description="Write a run's report page (HTML + PNGs).")
    p.add_argument("output_dir", help="the run's output_dir (holds log.jsonl, config.yaml, checkpoints)")
    p.add_argument("--out", default=None, help="where the page goes (default: OUTPUT_DIR/report)")
    p.add_argument("--images", nargs="+", default=None,
                   help="images for the attention maps (default: a few fixed ones of the run's data)")
    p.add_argument("--n-images", type=int, default=6, help="how many images when picked from the data")
    p.add_argument("--max-checkpoints", type=int, default=8, help="at most this many checkpoints (evenly spread)")
    return p


def main(argv: list[str] | None = None, prog: str = PROG) -> Path:
    args = build_parser(prog).parse_args(argv)
    if args.n_images <= 0 or args.max_checkpoints <= 0:
        raise cli.UsageError("--n-images and --max-checkpoints must be positive")
    from ssl_xcit.evaluate.report import write_report
    index = write_report(args.output_dir, args.out, [Path(p) for p in args.images] if args.images else None,
                         args.n_images, args.max_checkpoints)
    print(f"report written to {index}")
    return index

"""``python -m ssl_xcit.data.make_shards SRC DEST [--shard-size 1GB --resize 256 --quality 90]``: tar
shards (with an index and a manifest) from an image folder or archive; resumable.

The parser is here; the work is :func:`ssl_xcit.data.make_shards.make_shards`, whose errors about one
of its arguments (:class:`~ssl_xcit.data.make_shards.MakeShardsError` ``.option``) are said with its flag.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ssl_xcit import cli

PROG = "python -m ssl_xcit.data.make_shards"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog,
                                description="Write WebDataset-style tar shards (with an index and a manifest) "
                                            "from an image folder or archive; resumable.")
    p.add_argument("src", help="ImageFolder, flat folder, root with train/ (and val/), or .tar/.tar.gz")
    p.add_argument("dest", help="output folder (DEST/train and DEST/val for a root with train/)")
    p.add_argument("--shard-size", default="1GB", help="target shard size, e.g. 1GB, 500MB (default: %(default)s)")
    p.add_argument("--resize", type=int, default=None, help="scale the shorter side down to this many px")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality with --resize (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None, prog: str = PROG) -> dict[str, dict]:
    args = build_parser(prog).parse_args(argv)
    from ssl_xcit.data.make_shards import MakeShardsError, make_shards
    try:
        result = make_shards(args.src, args.dest, args.shard_size, args.resize, args.quality, not args.no_progress)
    except MakeShardsError as e:
        if not e.option:
            raise
        raise MakeShardsError(f"--{e.option.replace('_', '-')}: {e}") from None
    for split, m in result.items():
        where = Path(args.dest) / split if split != "." else Path(args.dest)
        print(f"{where}: {m['images']} images in {len(m['shards'])} shards, {len(m['classes'])} classes, "
              f"{m['skipped']} unreadable skipped")
    return result


def run_as_script() -> None:
    """``python -m ssl_xcit.data.make_shards``: one line and exit status 2 on a known error."""
    cli.run(main, prog=PROG)

"""Copy detection on Imagenette as recorded in benchmarks/RESULTS.md: the trained teacher against the same
arch from random weights and the pixels baseline, CLS and DINO's CLS + GeM, without and with whitening.

It runs ``eval/eval_copy_detection.py`` with the recorded settings (sized for a shared 2-core CPU:
300 val originals, 3,000 copies, 1,000 train distractors, whitening on 500 other train images, 96 px);
``--originals 1000 --n-distractors 10000 --imsize 320`` is the issue's and DINO's size on a GPU.

    python benchmarks/copy_detection.py --out /tmp/copydet [--teacher CKPT] [extra flags...]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path("/work/data/imagenette")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--data", default=str(DATA), help="Imagenette: val/ gives the originals, train/ the rest")
    p.add_argument("--teacher", default="/work/artifacts/teacher_in64/checkpoint.pth")
    args, extra = p.parse_known_args()
    data = Path(args.data)
    cmd = [sys.executable, str(REPO / "eval" / "eval_copy_detection.py"), "--data-path", str(data / "val"),
           "--originals", "300", "--distractors", str(data / "train"), "--n-distractors", "1000",
           "--whiten-data", str(data / "train"), "--n-whiten", "500",
           "--checkpoint", "pixels", args.teacher, "xcit_nano_12_p8", "--arch", "xcit_nano_12_p8",
           "--imsize", "96", "--num-workers", "1", "--out", args.out, *extra]
    sys.exit(subprocess.run(cmd, cwd=REPO).returncode)


if __name__ == "__main__":
    main()

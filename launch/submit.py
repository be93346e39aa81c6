#!/usr/bin/env python
"""Submit training or an evaluation tool to SLURM through submitit (``--help`` for the options).

    python launch/submit.py --config configs/X.yaml [key=value ...] --nodes 2 --gpus-per-node 8
    python launch/submit.py --gpus-per-node 1 eval_knn --checkpoint runs/x/checkpoint.pth --data-path DIR

A known error is one line on stderr and exit status 2 (``--debug`` shows the traceback).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_xcit.commands.submit import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Fine-tuning: ``python launch/finetune.py pretrained_weights=FILE data_path=DIR output_dir=OUT [key=value ...]``.

Exit status: 0 finished; 2 a known error (one line on stderr); 128 + signal number after a clean
stop on SIGTERM / SIGUSR2 / SIGHUP / Ctrl-C (checkpoint saved, the same command resumes); 130 after
a second Ctrl-C (nothing saved).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_xcit import cli  # noqa: E402  (imports nothing heavy: --help answers before torch loads)

if __name__ == "__main__":
    sys.exit(cli.run("ssl_xcit.commands.train:finetune_main", prog="launch/finetune.py"))

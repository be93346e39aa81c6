#!/usr/bin/env python
"""A run's report page: ``python eval/report.py OUTPUT_DIR`` writes ``OUTPUT_DIR/report/index.html``.

The curves of log.jsonl, the k-NN curve, collapse warnings and events, the config, and the teacher's
attention maps of a few fixed images per checkpoint. The code is ``ssl_xcit.evaluate.report`` (the command
line: ``ssl_xcit.commands.report``).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ssl_xcit import cli  # noqa: E402  (torch-free: the report module loads torch only for the maps)

if __name__ == "__main__":
    cli.run("ssl_xcit.commands.report:main", prog="report.py")

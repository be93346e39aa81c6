"""The quickstart stops like launch/train.py (issue 33): a signal to its whole process group saves the
step with one line and status 128 + signal, and the same command resumes, finishes and scores."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from tests.test_train_signals import _run_and_signal_the_group

REPO = Path(__file__).resolve().parents[1]


def test_sigterm_to_the_quickstarts_group_saves_and_the_same_command_finishes(cifar_small, tmp_path):
    out = tmp_path / "qs"
    argv = [sys.executable, "launch/quickstart.py", "--data", str(cifar_small), "--output", str(out),
            "--monitor-every-steps", "0", "--knn-train-images", "100", "--knn-val-images", "50", "--knn-k", "5",
            "batch_size_per_gpu=4", "max_images=200", "log_every_steps=1", "report=false", "tensorboard=false"]
    proc = _run_and_signal_the_group(argv, out / "train", signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    step = torch.load(out / "train" / "checkpoint.pth", weights_only=True)["global_step"]
    assert last.startswith("launch/quickstart.py: stopped on SIGTERM") and f"global step {step}" in last, last
    assert "Traceback" not in proc.stderr and 2 <= step < 50
    assert (out / "train" / "train.lock").read_text() == "", "the lock record must be cleared on the way out"
    again = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {out / 'train' / 'checkpoint.pth'} at global step {step}" in again.stdout
    report = json.loads((out / "quickstart.json").read_text())
    assert report["steps"] == 50 and report["train_minutes"] > 0 and "5" in report["trained"]

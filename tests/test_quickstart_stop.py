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


# ---- on the user's own images: CIFAR-10's cost, said once, and a k-NN sized to the classes

def _folder(root: Path, side: int, classes: int, per_class: int = 2) -> Path:
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"c{c:03d}"
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_on_larger_images_the_quickstart_keeps_cifars_crop_and_a_budget_and_says_why(tmp_path):
    from ssl_xcit.commands.quickstart import QUICKSTART_BUDGET_MINUTES, QUICKSTART_CROP, parse_args, training_config
    data = _folder(tmp_path / "big", 96, 3, per_class=12)
    args = parse_args(["--data", str(data)])
    cfg = training_config(args, data, tmp_path / "out")
    assert cfg.data.global_crops_size == QUICKSTART_CROP == cfg.eval.eval_crop_size   # the k-NN at the same size
    assert cfg.optim.time_budget_minutes == QUICKSTART_BUDGET_MINUTES
    said = " ".join(args.chosen)
    assert "median side 96 px" in said and "9x less compute" in said and "5-minute training budget" in said
    mine = parse_args(["--data", str(data), "global_crops_size=64", "max_steps=10"])
    cfg = training_config(mine, data, tmp_path / "out")
    assert (cfg.data.global_crops_size, cfg.optim.time_budget_minutes, cfg.run.max_steps) == (64, 0.0, 10)
    assert len(mine.chosen) == 0                              # what the user set wins, and nothing is said
    small = _folder(tmp_path / "small", 32, 3, per_class=12)
    args = parse_args(["--data", str(small)])
    assert training_config(args, small, tmp_path / "out").optim.time_budget_minutes == 0 and not args.chosen


def test_the_knn_grows_with_the_classes_unless_given(tmp_path):
    from ssl_xcit.commands.quickstart import parse_args, size_knn
    many = _folder(tmp_path / "many", 8, 150, per_class=1)
    args = parse_args(["--data", str(many)])
    said = size_knn(args, many)
    assert (args.knn_train_images, args.knn_val_images) == (15_000, 3_000) and len(said) == 2
    args = parse_args(["--data", str(many), "--knn-val-images", "500"])
    size_knn(args, many)
    assert (args.knn_train_images, args.knn_val_images) == (15_000, 500)
    few = _folder(tmp_path / "few", 8, 10, per_class=1)
    args = parse_args(["--data", str(few)])
    assert size_knn(args, few) == [] and (args.knn_train_images, args.knn_val_images) == (10_000, 2_000)

"""DINO on real CIFAR-10 images on the CPU: the engine learns (issue 3), and the README's quickstart
lifts k-NN clearly above the random backbone it started from (issue 4): the README command itself,
200 steps (about 5 minutes on 2 cores), and, in the heavy set, the same at 300 steps."""
import json
import math
from pathlib import Path

import pytest
import torch

from ssl_xcit.cli import UsageError
from ssl_xcit.evaluate.options import EvalInputError
from ssl_xcit.quickstart import DEFAULT_CONFIG, main as quickstart, parse_args, training_config
from ssl_xcit.train.config import load_config
from ssl_xcit.train.loop import train


def test_dino_loss_falls_on_real_images_without_collapse(cifar_root, tmp_path):
    """The quickstart recipe with its former multi-crop schedule (2 local crops, 2 epochs, last layer
    frozen in epoch 0), made cheaper (patch 16, batch 32, 80 steps, about a minute)."""
    out = tmp_path / "run"
    cfg = load_config(DEFAULT_CONFIG, [f"data_path={cifar_root / 'train'}", f"output_dir={out}",
                                       "arch=xcit_nano_12_p16", "batch_size_per_gpu=32", "max_images=2560",
                                       "local_crops_number=2", "epochs=2", "freeze_last_layer=1",
                                       "max_steps=80", "log_every_steps=1", "tensorboard=false",
                                       "num_workers=0", "report=false"])
    result = train(cfg)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "train"]
    assert result.global_step == 80 and steps[-1]["global_step"] == 80
    first, last = steps[0], steps[-10:]
    mean_last = sum(r["loss"] for r in last) / len(last)
    assert mean_last < first["loss"] - 0.1, (first["loss"], mean_last)
    ln_k = math.log(cfg.model.out_dim)
    assert all(r["teacher_entropy"] < 0.97 * ln_k for r in last), "teacher output is (near) uniform"
    assert all(r["teacher_kl_uniform"] < 0.9 * ln_k for r in last), "one prototype dominates"
    assert not [r for r in records if r["event"] == "collapse_warning"]


def test_overrides_may_follow_the_knn_k_list(cifar_small):
    args = parse_args(["--knn-k", "10", "20", "epochs=3", "--output", "o", "max_images=64",
                       "--data", str(cifar_small)])
    assert args.knn_k == [10, 20] and args.overrides == ["epochs=3", "max_images=64"] and args.output == "o"
    with pytest.raises(UsageError, match="invalid int value: 'ten'"):
        parse_args(["--knn-k", "ten"])


def test_the_knn_monitor_is_on_at_the_final_knn_resolution_and_can_be_changed(cifar_small, tmp_path):
    def config(*argv):
        return training_config(parse_args(["--data", str(cifar_small), *argv]), cifar_small, tmp_path).eval
    default = config()
    assert (default.eval_every_steps, default.eval_max_images, default.eval_data_path) == (50, 500, str(cifar_small))
    assert default.eval_crop_size == default.eval_resize == 32               # the quickstart's global crop
    assert config("global_crops_size=64").eval_resize == 64
    assert config("--monitor-every-steps", "20", "--monitor-images", "300").eval_every_steps == 20
    assert config("eval_max_images=100").eval_max_images == 100              # the user's keys win
    assert config("--monitor-every-steps", "0").eval_every_steps == 0
    with pytest.raises(EvalInputError, match="--monitor-images positive"):
        parse_args(["--data", str(cifar_small), "--monitor-images", "0"])


@pytest.fixture
def both_cores():
    """The quickstart is one process; let it use both cores of a CI machine (the suite default is 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _check_clear_gain(report: dict, out: Path, steps: int, min_gain: float, max_p: float) -> None:
    paired = report["paired"]["20"]
    trained, random_init = report["trained"]["20"]["top1"], report["random"]["20"]["top1"]
    assert report["steps"] == steps
    # "clearly above": a margin of points AND a paired exact test on the same 2,000 queries
    assert paired["gain"] >= min_gain, report
    assert paired["p_value"] < max_p, report
    assert paired["gain"] == pytest.approx(trained - random_init)
    assert paired["a_only"] - paired["b_only"] == round(paired["gain"] * 2000 / 100)
    saved = json.loads((out / "quickstart.json").read_text())
    assert saved["paired"]["20"] == paired and saved["trained"]["20"]["top1"] == trained


def _check_curve_and_page(report: dict, out: Path, steps: list[int]) -> None:
    """The k-NN monitor's curve (every 50 steps, 500 + 500 images) rises from the random start, is in
    quickstart.json and knn.png, and the run's report page was written at the end of training."""
    curve = report["knn_curve"]
    assert [r["global_step"] for r in curve] == steps, curve
    assert curve[-1]["top1"] > curve[0]["top1"], curve
    assert json.loads((out / "quickstart.json").read_text())["knn_curve"] == curve
    assert (out / "train" / "knn.png").stat().st_size > 0
    assert "knn.png" in (out / "train" / "report" / "index.html").read_text()


def test_quickstart_trained_teacher_clearly_beats_its_random_start(cifar_root, tmp_path, both_cores):
    """The README command as documented (200 steps of batch 32, 6,400 CIFAR-10 images).

    Measured on the 2-core machine: 34.45 vs 29.30 (+5.15 points, McNemar p = 6e-6), 5.1 min. With the
    k-NN monitor (2026-12-02, the CPU shared with other jobs): 34.45 vs 29.10 (+5.35, p = 3e-6), curve
    20.2 -> 23.4 top-1 (steps 0 -> 200), 32.9 min under that load.
    Other seeds at this budget (benchmarks/RESULTS.md) gained +3.6 to +5.4 over the seed-0 random
    backbone, so the bounds below leave room for a machine whose floating point differs.
    """
    out = tmp_path / "quickstart"
    report = quickstart(["--data", str(cifar_root), "--output", str(out), "--knn-train-images", "10000",
                         "--knn-val-images", "2000", "--knn-k", "20", "tensorboard=false"])
    _check_clear_gain(report, out, steps=200, min_gain=3.0, max_p=1e-3)
    _check_curve_and_page(report, out, steps=[0, 50, 100, 150, 200])


@pytest.mark.heavy
def test_quickstart_longer_run_clearly_beats_its_random_start(cifar_root, tmp_path, both_cores):
    """The README command with 300 steps (measured: 33.90 vs 29.30, +4.60, p = 6e-5, 8.4 min)."""
    out = tmp_path / "quickstart"
    report = quickstart(["--data", str(cifar_root), "--output", str(out), "--knn-train-images", "10000",
                         "--knn-val-images", "2000", "--knn-k", "20", "max_images=9600", "tensorboard=false"])
    _check_clear_gain(report, out, steps=300, min_gain=3.0, max_p=1e-3)
    _check_curve_and_page(report, out, steps=[0, 50, 100, 150, 200, 250, 300])

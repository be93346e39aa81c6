"""The k-NN monitor and the report page wired into the training loop (issue 12).

The monitor must not change the training it watches: a run with it gives bit for bit the same final
checkpoint (student, teacher, centre, RNG) as one without, also when the run is stopped and resumed.
The tiny run draws stochastic-depth masks from the global RNG every step, so an evaluation that moved
that RNG (its DataLoader draws a seed) or the teacher's BatchNorm statistics would show here.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ssl_xcit.train.loop import train
from tests.train_helpers import assert_same_weights, load_weights, tiny_config

# 8 images, batch 4: 2 steps an epoch, 2 epochs
RUN = dict(max_images=8, epochs=2)


def _monitor_keys(data: Path) -> dict:
    # every 3 steps and every epoch: points at steps 0 (the random start), 2, 3, 4
    return dict(eval_every_steps=3, eval_every_epochs=1, eval_data_path=str(data), eval_max_images=20,
                eval_knn_k=5, eval_crop_size=32, eval_resize=32, eval_batch_size=20)


def _records(out: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["event"] == event]


def _rng(out: Path) -> torch.Tensor:
    return torch.load(out / "checkpoint.pth", weights_only=True)["rng"][0]["torch"]


@pytest.fixture(scope="module")
def plain_run(cifar_small, tmp_path_factory) -> Path:
    """The tiny run without the monitor (the reference)."""
    out = tmp_path_factory.mktemp("plain")
    result = train(tiny_config(cifar_small / "train", out, **RUN))
    assert result.status == "finished" and result.global_step == 4
    return out


def test_monitor_leaves_the_training_bit_for_bit_and_logs_the_curve(cifar_small, plain_run, tmp_path):
    out = tmp_path / "watched"
    result = train(tiny_config(cifar_small / "train", out, report=True, **RUN, **_monitor_keys(cifar_small)))
    assert result.status == "finished" and result.global_step == 4
    assert_same_weights(load_weights(plain_run), load_weights(out))
    assert torch.equal(_rng(plain_run), _rng(out))
    assert [r["loss"] for r in _records(out, "train")] == [r["loss"] for r in _records(plain_run, "train")]

    knn = _records(out, "knn")
    assert [r["global_step"] for r in knn] == [0, 2, 3, 4]
    assert all(0.0 <= r["top1"] <= 100.0 and r["top1"] <= r["top5"] for r in knn)
    assert not _records(plain_run, "knn") and not (plain_run / "knn.png").exists()
    from PIL import Image
    with Image.open(out / "knn.png") as im:
        assert im.size[0] > 300
    page = (out / "report" / "index.html").read_text()
    assert "knn.png" in page and "top-1" in page
    assert not (plain_run / "report").exists()       # report=False (the test helper's default)


def test_a_resumed_run_continues_the_curve_without_a_second_point(cifar_small, plain_run, tmp_path):
    """Stopped after step 2 (max_steps), resumed to the end: the final checkpoint is the plain run's,
    the resumed process takes no point at its start step, and knn.png has the whole curve."""
    out = tmp_path / "pieces"
    keys = _monitor_keys(cifar_small)
    first = train(tiny_config(cifar_small / "train", out, max_steps=2, **RUN, **keys))
    assert first.global_step == 2 and [r["global_step"] for r in _records(out, "knn")] == [0, 2]
    second = train(tiny_config(cifar_small / "train", out, **RUN, **keys))
    assert second.global_step == 4
    assert [r["global_step"] for r in _records(out, "knn")] == [0, 2, 3, 4]
    assert_same_weights(load_weights(plain_run), load_weights(out))
    assert torch.equal(_rng(plain_run), _rng(out))
    assert (out / "knn.png").is_file()

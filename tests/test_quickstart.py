"""DINO on real CIFAR-10 images on the CPU: the engine learns (issue 3, fast) and the README's
quickstart beats a random backbone on k-NN (issue 4, heavy: ~9 minutes on 2 cores)."""
import json
import math
from pathlib import Path

import pytest

from ssl_xcit.quickstart import DEFAULT_CONFIG, main as quickstart
from ssl_xcit.train.config import load_config
from ssl_xcit.train.loop import train


def test_dino_loss_falls_on_real_images_without_collapse(cifar_root, tmp_path):
    """The quickstart recipe, made cheaper (patch 16, batch 32, 80 steps, about a minute)."""
    out = tmp_path / "run"
    cfg = load_config(DEFAULT_CONFIG, [f"data_path={cifar_root / 'train'}", f"output_dir={out}",
                                       "arch=xcit_nano_12_p16", "batch_size_per_gpu=32", "max_images=2560",
                                       "max_steps=80", "log_every_steps=1", "tensorboard=false",
                                       "num_workers=0"])
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


@pytest.mark.heavy
def test_quickstart_teacher_beats_random_backbone_on_knn(cifar_root, tmp_path):
    out = tmp_path / "quickstart"
    report = quickstart(["--data", str(cifar_root), "--output", str(out), "--knn-train-images", "10000",
                         "--knn-val-images", "2000", "--knn-k", "20", "tensorboard=false"])
    trained, random_init = report["trained"]["20"]["top1"], report["random"]["20"]["top1"]
    assert trained > random_init + 2.0, (trained, random_init)
    assert json.loads((Path(out) / "quickstart.json").read_text())["trained"]["20"]["top1"] == trained

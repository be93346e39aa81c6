"""KoLeo (DINOv2's spreading term): the value and gradient against a float64 brute force, its
precision under autocast, and its place in the training step and the loop."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from ssl_xcit.dino.koleo import koleo_loss, koleo_over_crops
from ssl_xcit.train.config import ConfigError
from ssl_xcit.train.loop import build_loss, build_models, train
from ssl_xcit.train.step import StepHParams, forward_loss
from tests.train_helpers import tiny_config


def _brute_force(features: np.ndarray, eps: float = 1e-8) -> float:
    """Every pairwise distance of the normalised rows in float64, the smallest other one per row."""
    x = features.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
    d = np.linalg.norm(x[:, None, :] - x[None, :, :], axis=-1)
    np.fill_diagonal(d, np.inf)
    return float(-np.log(d.min(axis=1) + eps).mean())


@pytest.mark.parametrize("n, dim, scale", [(2, 3, 1.0), (17, 8, 1.0), (64, 128, 0.01)])
def test_value_matches_a_float64_brute_force(n, dim, scale):
    g = torch.Generator().manual_seed(n)
    base = torch.randn(1, dim, generator=g)
    features = base + scale * torch.randn(n, dim, generator=g)   # scale 0.01: nearly parallel rows,
    expected = _brute_force(features.numpy())                    # as a fresh network's class tokens
    # rel 1e-6: torch's pairwise_distance (DINOv2's choice) adds its eps 1e-8 to each component
    assert koleo_loss(features.double()).item() == pytest.approx(expected, rel=1e-6)
    assert koleo_loss(features).item() == pytest.approx(expected, rel=1e-4)


def test_gradient_matches_finite_differences_and_spreads_the_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(koleo_loss, (x,))
    before = _brute_force(x.detach().numpy())
    koleo_loss(x).backward()
    with torch.no_grad():
        stepped = x - 1e-3 * x.grad
    assert _brute_force(stepped.numpy()) < before        # a descent step moves nearest neighbours apart


def test_under_bf16_autocast_it_computes_in_float32():
    g = torch.Generator().manual_seed(1)
    features = (torch.randn(1, 16, generator=g) + 0.05 * torch.randn(32, 16, generator=g)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = koleo_loss(features)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(_brute_force(features.float().numpy()), rel=1e-5)


def test_over_crops_sums_each_crop_and_bad_shapes_are_clear():
    g = torch.Generator().manual_seed(2)
    features = torch.randn(12, 4, generator=g, dtype=torch.float64)
    expected = _brute_force(features[:6].numpy()) + _brute_force(features[6:].numpy())
    assert koleo_over_crops(features, 2).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="not 5 equal crops"):
        koleo_over_crops(features, 5)
    with pytest.raises(ValueError, match=r"\(N >= 2, D\)"):
        koleo_loss(features[:1])


def test_the_step_adds_the_weighted_term_on_the_students_global_crops(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "run", drop_path_rate=0.0)
    torch.manual_seed(0)
    student, teacher = build_models(cfg)
    g = torch.Generator().manual_seed(3)
    crops = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    crops += [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]
    hp = StepHParams(lr=0.0, weight_decay=0.0, teacher_momentum=0.996, epoch=0, clip_grad=0.0,
                     freeze_last_layer=0)
    plain_loss = build_loss(cfg)
    plain = forward_loss(crops, student, teacher, plain_loss, hp)
    assert "koleo" not in plain_loss.last_stats

    weighted_loss = build_loss(cfg)
    weighted = forward_loss(crops, student, teacher, weighted_loss,
                            StepHParams(**{**hp.__dict__, "koleo_loss_weight": 0.25}))
    with torch.no_grad():   # independently: the class tokens of each global crop (one backbone call, as
        cls = student.backbone(torch.cat(crops[:2])).double().numpy()     # the step's BatchNorm sees)
        cls = [cls[:4], cls[4:]]
    koleo = sum(_brute_force(c) for c in cls)
    assert weighted_loss.last_stats["koleo"].item() == pytest.approx(koleo, rel=1e-5)
    assert weighted.item() == pytest.approx(plain.item() + 0.25 * koleo, rel=1e-5)
    assert torch.equal(plain_loss.center, weighted_loss.center)     # the DINO part is the same step

    # its gradient reaches the backbone but not the head (the term is on the backbone's features)
    student.zero_grad()
    (weighted - plain.detach()).backward()
    backbone_grads = [p.grad for p in student.backbone.parameters() if p.grad is not None]
    assert backbone_grads and any(g.abs().sum() > 0 for g in backbone_grads)


def test_the_loop_logs_koleo_and_bad_weights_are_one_line_errors(cifar_small, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(cifar_small, out, max_steps=2, koleo_loss_weight=0.1))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "train"]
    assert len(steps) == 2 and all(math.isfinite(r["koleo"]) for r in steps)
    train(tiny_config(cifar_small, tmp_path / "plain", max_steps=1))
    plain = [json.loads(line) for line in (tmp_path / "plain" / "log.jsonl").read_text().splitlines()]
    assert not [r for r in plain if "koleo" in r]
    with pytest.raises(ConfigError, match="koleo_loss_weight must be >= 0"):
        tiny_config(cifar_small, out, koleo_loss_weight=-0.1)
    with pytest.raises(ConfigError, match="needs batch_size_per_gpu >= 2"):
        tiny_config(cifar_small, out, koleo_loss_weight=0.1, batch_size_per_gpu=1)

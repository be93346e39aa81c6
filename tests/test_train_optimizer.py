"""build_optimizer: fused kernels (default on CUDA) give the same AdamW/SGD update as foreach."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ssl_xcit.train.config import ConfigError, load_config
from ssl_xcit.train.loop import build_optimizer


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 8))


def _run(optimizer_kind: str, fused: bool | None, steps: int = 4) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model()
    cfg = load_config(None, [f"optimizer={optimizer_kind}", f"fused={'null' if fused is None else str(fused).lower()}"])
    opt = build_optimizer(cfg, model)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for i, group in enumerate(opt.param_groups):     # what the loop's schedules do
            group["lr"] = 1e-2 * (step + 1)
            if group["apply_weight_decay"]:
                group["weight_decay"] = 0.04 + 0.01 * step
        x = torch.randn(8, 16, generator=g)
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_fused_update_equals_foreach(kind):
    fused, opt_f = _run(kind, True)
    plain, opt_p = _run(kind, False)
    assert all(g.get("fused") for g in opt_f.param_groups)
    assert all(g.get("foreach") and not g.get("fused") for g in opt_p.param_groups)
    moved = max((a - b).abs().max().item() for a, b in zip(plain.parameters(), _model().parameters()))
    assert moved > 1e-3                                  # the steps did something
    for a, b in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_default_is_foreach_off_cuda():
    _, opt = _run("adamw", None, steps=1)
    assert all(g.get("foreach") and not g.get("fused") for g in opt.param_groups)


def test_fused_must_be_a_bool_or_null():
    with pytest.raises(ConfigError, match="fused"):
        load_config(None, ["fused=sometimes"])

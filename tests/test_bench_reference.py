"""The step benchmark's reference is DINO's algorithm: in float64 with fp16 off, one step of the
official code as written in benchmarks/bench_train_step.py and one ssl_xcit train_step, from the same
weights and crops, give the same loss, centre, student and teacher (to float64 rounding)."""
from __future__ import annotations

import copy
import sys
import importlib.util
from pathlib import Path

import pytest
import torch

from ssl_xcit.train.config import load_config
from ssl_xcit.train.loop import build_models

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_step.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train_step"] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("clip", [1e9, 0.05])
def test_reference_step_equals_ssl_xcit_step_in_float64(clip):
    bench = _bench()
    cfg = load_config(None, ["arch=xcit_nano_12_p16", "out_dim=128", "head_hidden_dim=64",
                             "head_bottleneck_dim=32", "drop_path_rate=0.0", "precision=fp32", "device=cpu"])
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        student, teacher = build_models(cfg)
        student2, teacher2 = copy.deepcopy(student), copy.deepcopy(teacher)
        g = torch.Generator().manual_seed(1)
        crops = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
        crops += [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]
        ref = bench.OfficialStep(student, teacher, 128, 4, torch.device("cpu"), use_fp16=False, clip_grad=clip)
        ours = bench.OursStep(cfg, student2, teacher2, 4, torch.device("cpu"), clip_grad=clip)
        for _ in range(2):
            loss_ref, loss_ours = ref(crops), ours(crops)
            torch.testing.assert_close(loss_ours.double(), loss_ref.double(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.loss.center, ref.loss.center, rtol=1e-10, atol=1e-12)
        # clip 0.05 clips nearly every gradient, class attention's q, k, v included (one fused tensor in both)
        for (name, p_ref), p_ours in [*zip(student.named_parameters(), student2.parameters()),
                                      *zip(teacher.named_parameters(), teacher2.parameters())]:
            torch.testing.assert_close(p_ours, p_ref, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")
    finally:
        torch.set_default_dtype(old)

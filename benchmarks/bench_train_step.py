#!/usr/bin/env python
"""Training-step throughput of ssl_xcit's DINO step against a reference measured in the same run.

The reference is the textbook multi-crop forward: one backbone call per crop (what a naive port
does). Ours groups crops by resolution (one call per resolution). Printed as a ratio, never
asserted: timings depend on the machine, so only ratios measured side by side mean anything.

    python benchmarks/bench_train_step.py [--arch xcit_nano_12_p16] [--batch 32] [--global-size 224]
        [--local-size 96] [--local-crops 8] [--steps 5] [--device auto] [--precision fp32] [--compile]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_xcit.dino.loss import DINOLoss  # noqa: E402
from ssl_xcit.train.config import load_config  # noqa: E402
from ssl_xcit.train.loop import build_models, build_optimizer, pick_device  # noqa: E402
from ssl_xcit.train.step import StepHParams, train_step  # noqa: E402


class PerCropForward(torch.nn.Module):
    """Reference: backbone and head called once per crop."""

    def __init__(self, inner):
        super().__init__()
        self.backbone, self.head = inner.backbone, inner.head

    def forward(self, crops):
        return torch.cat([self.head(self.backbone(c)) for c in crops])


def time_steps(student, teacher, crops, cfg, device, steps) -> float:
    loss = DINOLoss(cfg.model.out_dim, len(crops)).to(device)
    opt = build_optimizer(cfg, student)
    hp = StepHParams(lr=1e-4, weight_decay=0.04, teacher_momentum=0.996, epoch=1, clip_grad=3.0,
                     freeze_last_layer=1)
    train_step(crops, student, teacher, loss, opt, None, hp, cfg.run.precision)   # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(crops, student, teacher, loss, opt, None, hp, cfg.run.precision)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="xcit_nano_12_p16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--local-crops", type=int, default=8)
    p.add_argument("--out-dim", type=int, default=65536)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true",
                   help="also time ours with run.compile (backbones compiled in place, one graph per crop size)")
    a = p.parse_args()
    cfg = load_config(None, [f"arch={a.arch}", f"out_dim={a.out_dim}", f"device={a.device}",
                             f"precision={a.precision}", "drop_path_rate=0.1"])
    device = pick_device(cfg.run.device)
    torch.manual_seed(0)
    crops = [torch.randn(a.batch, 3, a.global_size, a.global_size, device=device) for _ in range(2)]
    crops += [torch.randn(a.batch, 3, a.local_size, a.local_size, device=device) for _ in range(a.local_crops)]
    student, teacher = (m.to(device) for m in build_models(cfg))
    ours = time_steps(student, teacher, crops, cfg, device, a.steps)
    student, teacher = (m.to(device) for m in build_models(cfg))
    ref = time_steps(PerCropForward(student), PerCropForward(teacher), crops, cfg, device, a.steps)
    compiled = None
    if a.compile:
        student, teacher = (m.to(device) for m in build_models(cfg))
        student.backbone.compile(dynamic=False)    # what train() does for run.compile=true
        teacher.backbone.compile(dynamic=False)
        time_steps(student, teacher, crops, cfg, device, 1)   # compile outside the timing
        compiled = time_steps(student, teacher, crops, cfg, device, a.steps)
    images = a.batch
    print(f"device={device} arch={a.arch} batch={a.batch} crops=2x{a.global_size}+{a.local_crops}x{a.local_size} "
          f"precision={a.precision}")
    print(f"reference (one call per crop): {ref * 1e3:8.1f} ms/step  {images / ref:8.1f} img/s")
    print(f"ssl_xcit (one call per size) : {ours * 1e3:8.1f} ms/step  {images / ours:8.1f} img/s")
    print(f"speed-up: {ref / ours:.2f}x")
    if compiled is not None:
        print(f"ssl_xcit + compile           : {compiled * 1e3:8.1f} ms/step  {images / compiled:8.1f} img/s")
        print(f"speed-up with compile: {ref / compiled:.2f}x")


if __name__ == "__main__":
    main()

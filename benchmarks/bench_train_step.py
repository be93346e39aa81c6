#!/usr/bin/env python
"""DINO training-step throughput: ssl_xcit against the official recipe as users run it, same process.

The reference is facebookresearch/dino's ``train_one_epoch`` step written out plainly below:
crops grouped by resolution (its ``MultiCropWrapper``), fp16 autocast + ``GradScaler``, eager,
``torch.optim.AdamW`` built with no fused/foreach flag, its per-parameter clipping (one ``.item()``
per parameter), its DINO loss (a loop over crop pairs), its EMA loop over parameters and its
``loss.item()`` check. The model (XCiT backbone + DINO head) is the same module for both, so only the
way the step runs differs. Figures are printed as ratios against that reference, never asserted.

Variants of ssl_xcit (``--variants``): ``eager`` (the project's ``train_step`` as configured),
``compile`` (``run.compile``: backbones compiled in place, one graph per crop size), and
``percrop`` (one backbone call per crop, the textbook port nobody runs: a footnote only).

    python benchmarks/bench_train_step.py --arch xcit_small_12_p16 --batch 64 --global-size 224 \
        --local-size 96 --local-crops 10 --precision bf16 --device cuda --steps 10
    python benchmarks/bench_train_step.py --quick      # a tiny CPU run that checks the script works

Per variant: ms/step, images/s, peak memory (CUDA), model FLOP utilisation (MFU: the step's FLOPs
counted by ``torch.utils.flop_counter`` over the time, against the card's dense bf16/fp16 peak).
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_xcit.dino.loss import DINOLoss  # noqa: E402
from ssl_xcit.distributed import pick_device  # noqa: E402
from ssl_xcit.train.config import load_config  # noqa: E402
from ssl_xcit.train.loop import build_models, build_optimizer  # noqa: E402
from ssl_xcit.train.step import StepHParams, train_step  # noqa: E402

# Dense (no sparsity) bf16/fp16 tensor-core peaks, TFLOP/s, from the vendors' data sheets.
PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


# ----------------------------------------------------------------------------------------------------
# The reference: facebookresearch/dino main_dino.py / utils.py, as written (single process)
# ----------------------------------------------------------------------------------------------------
class OfficialMultiCropWrapper(nn.Module):
    """dino/utils.py ``MultiCropWrapper``: one backbone call per run of equal resolution."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        if not isinstance(x, list):
            x = [x]
        idx_crops = torch.cumsum(torch.unique_consecutive(
            torch.tensor([inp.shape[-1] for inp in x]), return_counts=True)[1], 0)
        start_idx, output = 0, torch.empty(0).to(x[0].device)
        for end_idx in idx_crops:
            _out = self.backbone(torch.cat(x[start_idx: end_idx]))
            if isinstance(_out, tuple):
                _out = _out[0]
            output = torch.cat((output, _out))
            start_idx = end_idx
        return self.head(output)


class OfficialDINOLoss(nn.Module):
    """main_dino.py ``DINOLoss`` (the all_reduce of the centre is a no-op in one process)."""

    def __init__(self, out_dim, ncrops, teacher_temp=0.04, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp, self.center_momentum, self.ncrops = student_temp, center_momentum, ncrops
        self.teacher_temp = teacher_temp
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output, teacher_output, epoch):
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        teacher_out = F.softmax((teacher_output - self.center) / self.teacher_temp, dim=-1).detach().chunk(2)
        total_loss, n_loss_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def official_params_groups(model: nn.Module):
    """dino/utils.py ``get_params_groups``."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.}]


def official_clip_gradients(model: nn.Module, clip: float):
    """dino/utils.py ``clip_gradients``: per parameter, with a host sync per parameter. The official
    XCiT holds class attention's q, k, v in one ``qkv`` parameter (weight and bias): timm's split
    ``q``/``k``/``v`` are clipped here as that one fused tensor."""
    params = dict(model.named_parameters())
    norms = []
    for name, p in params.items():
        if p.grad is None or any(f".attn.{x}." in name and "cls_attn" in name for x in "kv"):
            continue   # k and v of class attention go with their q
        fused = [p]
        if "cls_attn" in name and ".attn.q." in name:
            fused = [params[name.replace(".attn.q.", f".attn.{x}.")] for x in "qkv"]
        param_norm = torch.cat([f.grad.data.reshape(-1) for f in fused]).norm(2)
        norms.append(param_norm.item())
        clip_coef = clip / (param_norm + 1e-6)
        if clip_coef < 1:
            for f in fused:
                f.grad.data.mul_(clip_coef)
    return norms


class OfficialStep:
    """One iteration of main_dino.py ``train_one_epoch`` (fp16 scaler on, clip_grad 3.0)."""

    def __init__(self, student, teacher, out_dim, ncrops, device, lr=5e-4, wd=0.04, momentum=0.996,
                 use_fp16: bool = True, clip_grad: float = 3.0):
        self.student = OfficialMultiCropWrapper(student.backbone, student.head).to(device)
        self.teacher = OfficialMultiCropWrapper(teacher.backbone, teacher.head).to(device)
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.loss = OfficialDINOLoss(out_dim, ncrops).to(device)
        self.optimizer = torch.optim.AdamW(official_params_groups(self.student))
        self.scaler = torch.amp.GradScaler(device.type) if use_fp16 else None   # DINO's --use_fp16
        self.device, self.lr, self.wd, self.m, self.clip = device, lr, wd, momentum, clip_grad

    def __call__(self, images, epoch=1):
        for i, param_group in enumerate(self.optimizer.param_groups):
            param_group["lr"] = self.lr
            if i == 0:
                param_group["weight_decay"] = self.wd
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.scaler is not None):
            teacher_output = self.teacher(images[:2])
            student_output = self.student(images)
            loss = self.loss(student_output, teacher_output, epoch)
        if not math.isfinite(loss.item()):
            raise FloatingPointError("reference loss is not finite")
        self.optimizer.zero_grad()
        if self.scaler is None:
            loss.backward()
            official_clip_gradients(self.student, self.clip)
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            official_clip_gradients(self.student, self.clip)
            # cancel_gradients_last_layer: epoch >= freeze_last_layer here, nothing to cancel
            self.scaler.step(self.optimizer)
            self.scaler.update()
        with torch.no_grad():
            for param_q, param_k in zip(self.student.parameters(), self.teacher.parameters()):
                param_k.data.mul_(self.m).add_((1 - self.m) * param_q.detach().data)
        return loss


# ----------------------------------------------------------------------------------------------------
# ssl_xcit variants
# ----------------------------------------------------------------------------------------------------
class PerCropForward(nn.Module):
    """Footnote only: backbone and head called once per crop."""

    def __init__(self, inner):
        super().__init__()
        self.backbone, self.head = inner.backbone, inner.head

    def forward(self, crops):
        return torch.cat([self.head(self.backbone(c)) for c in crops])


class OursStep:
    def __init__(self, cfg, student, teacher, ncrops, device, clip_grad: float = 3.0):
        self.student, self.teacher = student, teacher
        self.loss = DINOLoss(cfg.model.out_dim, ncrops).to(device)
        self.optimizer = build_optimizer(cfg, student)
        self.scaler = torch.amp.GradScaler(device.type) if cfg.run.precision == "fp16" else None
        self.hp = StepHParams(lr=5e-4, weight_decay=0.04, teacher_momentum=0.996, epoch=1,
                              clip_grad=clip_grad, freeze_last_layer=1)
        self.precision = cfg.run.precision

    def __call__(self, images, epoch=1):
        out = train_step(images, self.student, self.teacher, self.loss, self.optimizer, self.scaler, self.hp,
                         self.precision)
        return out.loss


# ----------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    ms: float
    images_per_s: float
    peak_gib: float | None
    tflops: float | None
    mfu: float | None
    note: str = ""


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_flops(step, crops) -> float:
    """FLOPs of one step (teacher forward, student forward + backward), counted by torch's dispatcher."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        step(crops)
    return float(counter.get_total_flops())


def measure(name, step, crops, device, steps, warmup, flops, peak) -> Row:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step(crops)
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(crops)
        _sync(device)
        times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    batch = crops[0].shape[0]
    peak_gib = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    tflops = flops / sec / 1e12 if flops else None
    mfu = tflops / peak if (tflops and peak) else None
    return Row(name, sec * 1e3, batch / sec, peak_gib, tflops, mfu)


def card_peak(device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def print_table(rows: list[Row], ref: Row, header: str) -> None:
    print(header)
    print(f"| {'variant':<34} | {'ms/step':>8} | {'img/s':>8} | {'vs ref':>6} | {'peak GiB':>8} | "
          f"{'TFLOP/s':>7} | {'MFU':>6} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 10}|{'-' * 8}|{'-' * 10}|{'-' * 9}|{'-' * 8}|")
    for r in rows:
        peak = f"{r.peak_gib:8.2f}" if r.peak_gib is not None else f"{'-':>8}"
        tf = f"{r.tflops:7.1f}" if r.tflops is not None else f"{'-':>7}"
        mfu = f"{100 * r.mfu:5.1f}%" if r.mfu is not None else f"{'-':>6}"
        print(f"| {r.name:<34} | {r.ms:8.1f} | {r.images_per_s:8.1f} | {r.images_per_s / ref.images_per_s:5.2f}x | "
              f"{peak} | {tf} | {mfu} |" + (f" {r.note}" if r.note else ""))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="xcit_small_12_p16")
    p.add_argument("--batch", type=int, default=64, help="per-GPU batch")
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--local-crops", type=int, default=10)
    p.add_argument("--out-dim", type=int, default=65536)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"], help="ssl_xcit's precision")
    p.add_argument("--variants", default="eager,compile", help="comma list of: eager, compile, percrop")
    p.add_argument("--overrides", nargs="*", default=[], metavar="key=value",
                   help="config overrides applied to the ssl_xcit variants (e.g. fused=true)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense peak; read from its name if known")
    p.add_argument("--quick", action="store_true", help="tiny CPU-sized run (nano, 32/16 px, 2 steps)")
    return p


def main(argv: list[str] | None = None) -> list[Row]:
    a = build_parser().parse_args(argv)
    if a.quick:
        a.arch, a.batch, a.global_size, a.local_size, a.local_crops = "xcit_nano_12_p16", 4, 32, 16, 2
        a.out_dim, a.steps, a.warmup = 1024, 2, 1
    cfg = load_config(None, [f"arch={a.arch}", f"out_dim={a.out_dim}", f"device={a.device}",
                             f"precision={a.precision}", "drop_path_rate=0.1", *a.overrides])
    device = pick_device(cfg.run.device)
    peak = card_peak(device, a.peak_tflops)
    torch.manual_seed(0)
    crops = [torch.randn(a.batch, 3, a.global_size, a.global_size, device=device) for _ in range(2)]
    crops += [torch.randn(a.batch, 3, a.local_size, a.local_size, device=device) for _ in range(a.local_crops)]
    ncrops = len(crops)

    def fresh():
        torch.manual_seed(0)
        return tuple(m.to(device) for m in build_models(cfg))

    rows: list[Row] = []
    student, teacher = fresh()
    ref_step = OfficialStep(student, teacher, a.out_dim, ncrops, device)
    flops = step_flops(ref_step, crops)
    ref = measure("official DINO (fp16+scaler, eager)", ref_step, crops, device, a.steps, a.warmup, flops, peak)
    rows.append(ref)
    del ref_step, student, teacher
    for variant in [v.strip() for v in a.variants.split(",") if v.strip()]:
        student, teacher = fresh()
        if variant == "compile":
            student.backbone.compile(dynamic=False)      # what train() does for run.compile=true
            teacher.backbone.compile(dynamic=False)
            name = f"ssl_xcit {a.precision} + compile"
        elif variant == "percrop":
            student, teacher = PerCropForward(student), PerCropForward(teacher)
            name = f"(footnote) one call per crop, {a.precision}"
        elif variant == "eager":
            name = f"ssl_xcit {a.precision} eager"
        else:
            raise SystemExit(f"unknown variant {variant!r}: use eager, compile, percrop")
        if a.overrides:
            name += " " + " ".join(a.overrides)
        step = OursStep(cfg, student, teacher, ncrops, device)
        t0 = time.perf_counter()
        step(crops)   # compile (or warm) outside the timing
        first = time.perf_counter() - t0
        row = measure(name, step, crops, device, a.steps, a.warmup, flops, peak)
        row.note = f"first step {first:.1f} s" if variant == "compile" else ""
        rows.append(row)
        del step, student, teacher
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = (f"{card}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}: {a.arch}, batch {a.batch}, "
              f"crops 2x{a.global_size} + {a.local_crops}x{a.local_size}, out_dim {a.out_dim}; "
              f"{flops / a.batch / 1e9:.1f} GFLOP per image per step; peak {peak or '?'} TFLOP/s")
    print_table(rows, ref, header)
    return rows


if __name__ == "__main__":
    main()

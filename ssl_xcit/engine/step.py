"""One optimizer update as every loop takes it, around what the loop does to its gradients:
the scheduled lr (and weight decay) into the optimizer's groups, backward (scaled under fp16),
the loop's own work on the gradients (clipping, freezing), the optimizer step (the scaler's under
fp16). The loop's step module (:mod:`ssl_xcit.train.step`, :mod:`ssl_xcit.finetune.step`) holds
its forward, its loss and what it does after the step (the teacher's EMA, the weights' EMA).
"""
from __future__ import annotations

import contextlib
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs a loss scaler (its gradients underflow); bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Every group gets the lr (times its ``lr_scale``, e.g. a pretrained backbone's); groups that
    decay (``weight_decay`` > 0 at build time) get the wd."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if group.get("apply_weight_decay", True):
            group["weight_decay"] = weight_decay


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                      on_gradients: Callable[[], T]) -> T:
    """Backward, ``on_gradients()`` on the (unscaled) gradients -- clipping, freezing; its result is
    returned, e.g. the gradient norm --, then the optimizer step. The caller has set the schedules
    and zeroed the gradients."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    result = on_gradients()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return result

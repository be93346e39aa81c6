"""One DINO training step as a function of (crops, state): no I/O, no host syncs but the ones the
caller asks for, so it can be tested, timed and compiled on its own.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ssl_xcit.dino.ema import unwrap, update_teacher
from ssl_xcit.dino.head import cancel_last_layer_gradients


@dataclass
class StepHParams:
    """The scheduled values for one step (read from the schedules by the loop)."""
    lr: float
    weight_decay: float
    teacher_momentum: float
    epoch: int
    clip_grad: float
    freeze_last_layer: int


@dataclass
class StepOutput:
    loss: torch.Tensor          # detached scalar
    grad_norm: torch.Tensor     # global L2 norm of the gradients before clipping
    teacher_entropy: torch.Tensor
    teacher_kl_uniform: torch.Tensor


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Every group gets the lr; groups that decay (``weight_decay`` > 0 at build time) get the wd."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_weight_decay", True):
            group["weight_decay"] = weight_decay


def clip_gradients_per_parameter(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """DINO's clipping: each parameter's gradient is scaled to norm <= ``max_norm`` on its own.

    Returns the global gradient norm before clipping, for logging.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm > 0:
        coefs = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
        torch._foreach_mul_(grads, coefs)
    return total


def train_step(crops: list[torch.Tensor], student: nn.Module, teacher: nn.Module, dino_loss: nn.Module,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
               hp: StepHParams, precision: str = "fp32") -> StepOutput:
    """Forward teacher (2 global crops) and student (all crops), DINO loss, backward, clip,
    freeze the last layer in the first epochs, optimizer step, EMA update of the teacher."""
    device = crops[0].device
    apply_schedules(optimizer, hp.lr, hp.weight_decay)
    with autocast_context(device, precision):
        with torch.no_grad():
            teacher_output = teacher(crops[:2])
        student_output = student(crops)
        loss = dino_loss(student_output, teacher_output, hp.epoch)

    optimizer.zero_grad(set_to_none=True)
    params = [p for p in student.parameters() if p.requires_grad]
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = clip_gradients_per_parameter(params, hp.clip_grad)
        cancel_last_layer_gradients(unwrap(student).head, hp.epoch, hp.freeze_last_layer)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        grad_norm = clip_gradients_per_parameter(params, hp.clip_grad)
        cancel_last_layer_gradients(unwrap(student).head, hp.epoch, hp.freeze_last_layer)
        optimizer.step()

    update_teacher(unwrap(student), teacher, hp.teacher_momentum)
    stats = dino_loss.last_stats
    return StepOutput(loss.detach(), grad_norm.detach(), stats["teacher_entropy"], stats["teacher_kl_uniform"])


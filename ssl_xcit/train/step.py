"""One DINO training step as a function of (crops, state): no I/O, no host syncs but the ones the
caller asks for, so it can be tested, timed and compiled on its own.

The step comes in two halves so that the caller can look at the loss between them, as DINO's
``main_dino.py`` does (``if not math.isfinite(loss.item()): sys.exit(1)`` before ``backward``):
:func:`forward_loss` changes nothing but the loss centre, :func:`apply_update` does backward, clipping,
the optimizer step and the teacher's EMA. Under DDP every rank must take the same decision between
them (``backward`` is collective). :func:`train_step` is both halves in a row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ssl_xcit.dino.ema import unwrap, update_teacher
from ssl_xcit.dino.head import cancel_last_layer_gradients
from ssl_xcit.dino.koleo import koleo_over_crops
from ssl_xcit.dino.optim import gradient_clip_groups
from ssl_xcit.engine.step import apply_schedules, autocast_context, backward_and_step


@dataclass
class StepHParams:
    """The scheduled values for one step (read from the schedules by the loop)."""
    lr: float
    weight_decay: float
    teacher_momentum: float
    epoch: int
    clip_grad: float
    freeze_last_layer: int
    koleo_loss_weight: float = 0.0   # > 0: DINOv2's KoLeo on the student's global-crop features
    freeze_backbone: bool = False    # only the student's head learns in this step (a fresh head's warm-up)


@dataclass
class StepOutput:
    loss: torch.Tensor          # detached scalar
    grad_norm: torch.Tensor     # global L2 norm of the gradients before clipping
    teacher_entropy: torch.Tensor
    teacher_kl_uniform: torch.Tensor
    koleo: torch.Tensor | None = None   # the KoLeo term (unweighted) when the step has one


def clip_gradients(groups: list[list[nn.Parameter]], max_norm: float) -> torch.Tensor:
    """DINO's clipping: each group's gradient is scaled to norm <= ``max_norm`` on its own
    (``clip / (norm + 1e-6)`` when below 1). A group is one parameter, or the parameters that the
    official model holds as one tensor (:func:`ssl_xcit.dino.optim.gradient_clip_groups`).

    Returns the global gradient norm before clipping, for logging.
    """
    groups = [[p for p in g if p.grad is not None] for g in groups]
    groups = [g for g in groups if g]
    grads = [p.grad for g in groups for p in g]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm > 0:
        coefs, i = [], 0
        for g in groups:
            n = len(g)
            norm = norms[i] if n == 1 else torch.linalg.vector_norm(torch.stack(norms[i:i + n]))
            coefs += [torch.clamp(max_norm / (norm + 1e-6), max=1.0)] * n
            i += n
        torch._foreach_mul_(grads, coefs)
    return total


def forward_loss(crops: list[torch.Tensor], student: nn.Module, teacher: nn.Module, dino_loss: nn.Module,
                 hp: StepHParams, precision: str = "fp32") -> torch.Tensor:
    """Teacher (2 global crops) and student (all crops) forward, DINO loss (updates its centre),
    plus ``hp.koleo_loss_weight`` x KoLeo of the student's global-crop features when that is > 0
    (its unweighted value goes to ``dino_loss.last_stats["koleo"]``)."""
    with autocast_context(crops[0].device, precision):
        with torch.no_grad():
            teacher_output = teacher(crops[:2])
        if hp.koleo_loss_weight <= 0:
            return dino_loss(student(crops), teacher_output, hp.epoch)
        student_output, features = student(crops, return_features=True)
        loss = dino_loss(student_output, teacher_output, hp.epoch)
    n_global = dino_loss.n_global_crops
    koleo = koleo_over_crops(features[:n_global * crops[0].shape[0]], n_global)
    dino_loss.last_stats["koleo"] = koleo.detach()
    return loss + hp.koleo_loss_weight * koleo


def apply_update(loss: torch.Tensor, student: nn.Module, teacher: nn.Module, dino_loss: nn.Module,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                 hp: StepHParams, clip_groups: list[list[nn.Parameter]] | None = None) -> StepOutput:
    """Backward, clip, freeze the last layer in the first epochs, optimizer step, EMA update of
    the teacher. ``clip_groups`` defaults to :func:`gradient_clip_groups` of the student."""
    apply_schedules(optimizer, hp.lr, hp.weight_decay)
    optimizer.zero_grad(set_to_none=True)
    if clip_groups is None:
        clip_groups = gradient_clip_groups(unwrap(student))

    def on_gradients() -> torch.Tensor:
        grad_norm = clip_gradients(clip_groups, hp.clip_grad)
        _cancel_frozen_gradients(unwrap(student), hp)
        return grad_norm
    grad_norm = backward_and_step(loss, optimizer, scaler, on_gradients)
    update_teacher(unwrap(student), teacher, hp.teacher_momentum)
    stats = dino_loss.last_stats
    return StepOutput(loss.detach(), grad_norm.detach(), stats["teacher_entropy"], stats["teacher_kl_uniform"],
                      stats.get("koleo"))


def _cancel_frozen_gradients(student: nn.Module, hp: StepHParams) -> None:
    """DINO's frozen last layer in the first epochs, and the whole backbone while a fresh head warms
    up on pretrained features. Gradients become ``None``, so AdamW neither steps nor decays them."""
    cancel_last_layer_gradients(student.head, hp.epoch, hp.freeze_last_layer)
    if hp.freeze_backbone:
        for p in student.backbone.parameters():
            p.grad = None


def train_step(crops: list[torch.Tensor], student: nn.Module, teacher: nn.Module, dino_loss: nn.Module,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
               hp: StepHParams, precision: str = "fp32") -> StepOutput:
    """:func:`forward_loss` then :func:`apply_update`, with no look at the loss in between."""
    loss = forward_loss(crops, student, teacher, dino_loss, hp, precision)
    return apply_update(loss, student, teacher, dino_loss, optimizer, scaler, hp)

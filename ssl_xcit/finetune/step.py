"""One fine-tuning step as a function of (images, labels, state), in the two halves pretraining's
step has (:mod:`ssl_xcit.train.step`; the update itself is :mod:`ssl_xcit.engine.step`'s): :func:`forward_loss` (mixup/cutmix, forward, loss; changes
nothing), then, once every rank has seen a finite loss, :func:`apply_update` (backward, clipping,
the optimizer step, the EMA). No I/O, no host sync the caller does not ask for.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ssl_xcit.dino.ema import unwrap
from ssl_xcit.engine.step import apply_schedules, autocast_context, backward_and_step


@dataclass
class FinetuneStepOutput:
    grad_norm: torch.Tensor | None   # global gradient norm before clipping (when clipping)


def hold_backbone_norm_stats(model: nn.Module, frozen: bool) -> None:
    """While the backbone is frozen (``freeze_backbone_steps``), its BatchNorm layers (XCiT's conv
    stem and LPI) use and keep their running statistics (eval mode): frozen means the file's backbone
    is untouched, buffers included, so the head fits the very features the start has. Train mode
    comes back with the first step that updates the backbone."""
    for name, module in unwrap(model).named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not name.startswith("head"):
            module.train(not frozen)


def forward_loss(images: torch.Tensor, labels: torch.Tensor, model: nn.Module, criterion: nn.Module,
                 mixup=None, precision: str = "fp32") -> torch.Tensor:
    """Mix the batch (timm's Mixup draws from NumPy's global RNG: a checkpoint restores it), then
    the classifier's loss against the (soft) targets. Mixup needs an even batch: an odd one (an
    unreadable image was dropped) loses its last image."""
    if mixup is not None:
        if images.shape[0] % 2:
            images, labels = images[:-1], labels[:-1]
        images, labels = mixup(images, labels)
    with autocast_context(images.device, precision):
        return criterion(model(images), labels)


def apply_update(loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler | None, lr: float, clip_grad: float = 0.0,
                 ema=None, step: int = 0, head_only: bool = False) -> FinetuneStepOutput:
    """Backward, optional global-norm clipping, the optimizer step at ``lr`` (times each group's
    layer-decay ``lr_scale``), then the EMA of the weights. ``head_only``: the backbone's gradients
    are dropped (a new head first learns on the pretrained features, as in linear-probe-then-fine-tune:
    a random head's early gradients would otherwise distort them)."""
    apply_schedules(optimizer, lr, 0.0)   # groups keep their own weight decay (apply_weight_decay False)
    optimizer.zero_grad(set_to_none=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def on_gradients() -> torch.Tensor | None:
        if head_only:
            for name, p in unwrap(model).named_parameters():
                if not name.startswith("head."):
                    p.grad = None
        return torch.nn.utils.clip_grad_norm_(params, clip_grad) if clip_grad > 0 else None   # skips grad None
    grad_norm = backward_and_step(loss, optimizer, scaler, on_gradients)
    if ema is not None:
        ema.update(unwrap(model), step=step)
    return FinetuneStepOutput(grad_norm.detach() if grad_norm is not None else None)

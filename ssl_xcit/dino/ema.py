"""Teacher = exponential moving average of the student's parameters.

Buffers are NOT averaged or copied: as in DINO, the teacher is never put in eval mode, so its
BatchNorm layers (XCiT has them in the conv patch embedding and the LPI blocks) normalise with
the statistics of the teacher's own batch of global crops and keep their own running stats.
Only :func:`copy_student_to_teacher` (at initialisation) copies buffers.
"""
from __future__ import annotations

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (``.module``) and/or ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _matched_parameters(student: nn.Module, teacher: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    s_params = dict(unwrap(student).named_parameters())
    t_params = dict(unwrap(teacher).named_parameters())
    if s_params.keys() != t_params.keys():
        only_s = sorted(s_params.keys() - t_params.keys())
        only_t = sorted(t_params.keys() - s_params.keys())
        raise ValueError("student and teacher parameter names differ: "
                         f"only in student {only_s[:5]}{' ...' if len(only_s) > 5 else ''}, "
                         f"only in teacher {only_t[:5]}{' ...' if len(only_t) > 5 else ''}")
    names = list(t_params)
    for n in names:
        if s_params[n].shape != t_params[n].shape:
            raise ValueError(f"parameter {n!r}: student shape {tuple(s_params[n].shape)} != teacher "
                             f"shape {tuple(t_params[n].shape)}")
    return [t_params[n] for n in names], [s_params[n] for n in names]


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """``teacher = m * teacher + (1 - m) * student`` for every parameter, matched by name.

    Uses ``torch._foreach_mul_`` / ``_foreach_add_`` (one fused kernel per device/dtype group
    instead of one per parameter). DDP- or compile-wrapped modules are unwrapped first.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"update_teacher: momentum must be in [0, 1], got {momentum}")
    t_list, s_list = _matched_parameters(student, teacher)
    if not t_list:
        return
    s_list = [s.to(dtype=t.dtype, device=t.device) for s, t in zip(s_list, t_list)]
    torch._foreach_mul_(t_list, momentum)
    torch._foreach_add_(t_list, s_list, alpha=1.0 - momentum)


@torch.no_grad()
def copy_student_to_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """Start the teacher from the student (parameters and buffers) and freeze its parameters."""
    _matched_parameters(student, teacher)  # same names/shapes, or a clear error
    unwrap(teacher).load_state_dict(unwrap(student).state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)

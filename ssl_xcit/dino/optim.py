"""Optimizer parameter groups: weight decay on weight matrices only.

Rule (DINO's): no decay for parameters with ``ndim <= 1`` (biases, LayerNorm/BatchNorm affine,
XCiT's layer-scale ``gamma1``/``gamma2``) or whose name ends in ``.bias``. Frozen parameters
(``requires_grad=False``, e.g. the head's fixed weight-norm g) are left out altogether.

XCiT's per-head ``temperature`` (shape ``(heads, 1, 1)``) and ``cls_token`` are 3-D, so DINO's
rule decays them, and so does this function by default: that is what the DINO-pretrained XCiT
checkpoints were trained with. XCiT's supervised recipe exempted ``temperature``; pass
``no_decay_names=("temperature",)`` to follow it.
"""
from __future__ import annotations

from typing import Any, Iterable

from torch import nn


def param_groups_for_weight_decay(model: nn.Module, no_decay_names: Iterable[str] = ()) -> list[dict[str, Any]]:
    """``[{'params': decayed}, {'params': not_decayed, 'weight_decay': 0.0}]`` -- always both.

    Group 0 is always the decayed one, so a weight-decay schedule can set
    ``optimizer.param_groups[0]['weight_decay']`` each iteration (as DINO does).
    ``no_decay_names``: extra name components (e.g. ``"temperature"``) exempted from decay.
    """
    extra = set(no_decay_names)
    decayed, not_decayed = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or extra.intersection(name.split(".")):
            not_decayed.append(p)
        else:
            decayed.append(p)
    if not decayed and not not_decayed:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return [{"params": decayed}, {"params": not_decayed, "weight_decay": 0.0}]

"""Optimizer parameter groups: weight decay on weight matrices only.

Rule (DINO's): no decay for parameters with ``ndim <= 1`` (biases, LayerNorm/BatchNorm affine,
XCiT's layer-scale ``gamma1``/``gamma2``) or whose name ends in ``.bias``. Frozen parameters
(``requires_grad=False``, e.g. the head's fixed weight-norm g) are left out altogether.

XCiT's per-head ``temperature`` (shape ``(heads, 1, 1)``) and ``cls_token`` are 3-D, so DINO's
rule decays them, and so does this function by default: that is what the DINO-pretrained XCiT
checkpoints were trained with. XCiT's supervised recipe exempted ``temperature``; pass
``no_decay_names=("temperature",)`` to follow it.

Gradient clipping groups (:func:`gradient_clip_groups`): DINO clips each parameter's gradient on its
own, and the official XCiT holds the class-attention q, k and v in one fused ``qkv`` Linear. timm
(and so ssl_xcit) splits it into ``q``, ``k`` and ``v``; clipping those three as one tensor (weights
together, biases together) gives the official update.
"""
from __future__ import annotations

from typing import Any, Iterable

from torch import nn

_SPLIT_QKV = ("q", "k", "v")


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


def gradient_clip_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """The trainable parameters in the groups whose gradient is clipped as one tensor.

    One group per parameter (DINO's rule), except that an attention module with separate ``q``,
    ``k`` and ``v`` Linear layers (XCiT's class attention in timm) contributes one group for the
    three weights and one for the three biases: the official fused ``qkv`` weight and bias. Groups
    are in ``named_parameters`` order (a fused group where its first member is).
    """
    groups: list[list[nn.Parameter]] = []
    fused: dict[str, list[nn.Parameter]] = {}
    for module_name, module in model.named_modules():
        if all(isinstance(getattr(module, x, None), nn.Linear) for x in _SPLIT_QKV):
            for kind in ("weight", "bias"):
                params = [getattr(getattr(module, x), kind) for x in _SPLIT_QKV]
                if all(p is not None and p.requires_grad for p in params):
                    for x in _SPLIT_QKV:
                        fused[f"{module_name}.{x}.{kind}".lstrip(".")] = params
    placed: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = fused.get(name, [p])
        if id(group[0]) not in placed:
            placed.add(id(group[0]))
            groups.append(group)
    return groups

"""Weight-decay parameter groups on a real XCiT + DINO head."""
from __future__ import annotations

import timm
import torch

from ssl_xcit.dino.head import DINOHead
from ssl_xcit.dino.multicrop import MultiCropForward
from ssl_xcit.dino.optim import param_groups_for_weight_decay


def _model() -> torch.nn.Module:
    backbone = timm.create_model("xcit_nano_12_p16_224", pretrained=False, num_classes=0)
    return MultiCropForward(backbone, DINOHead(backbone.num_features, out_dim=32, hidden_dim=64, bottleneck_dim=16))


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_groups_follow_dino_rule():
    model = _model()
    groups = param_groups_for_weight_decay(model)
    decayed, plain = _names(model, groups[0]), _names(model, groups[1])
    assert "weight_decay" not in groups[0] and groups[1]["weight_decay"] == 0.0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | plain == trainable and not decayed & plain
    assert "head.last_layer.parametrizations.weight.original0" not in trainable  # frozen g left out
    for n, p in model.named_parameters():
        if n in trainable:
            assert (n in plain) == (p.ndim <= 1 or n.endswith(".bias")), n
    assert "backbone.blocks.0.attn.temperature" in decayed  # DINO rule: 3-D, decayed
    assert "backbone.blocks.0.gamma1" in plain and "backbone.blocks.0.norm1.weight" in plain
    assert "backbone.blocks.0.attn.qkv.weight" in decayed
    torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.04)  # usable as is


def test_extra_no_decay_names():
    model = _model()
    groups = param_groups_for_weight_decay(model, no_decay_names=("temperature",))
    assert "backbone.blocks.0.attn.temperature" in _names(model, groups[1])
    assert not any("temperature" in n for n in _names(model, groups[0]))


def test_both_groups_always_present():
    groups = param_groups_for_weight_decay(torch.nn.Linear(3, 3, bias=False))
    assert len(groups) == 2 and groups[1]["params"] == []
    torch.optim.AdamW(groups, lr=1e-3)

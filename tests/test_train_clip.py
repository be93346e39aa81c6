"""Gradient clipping as the official recipe: DINO clips each parameter to norm <= clip_grad, and the
official XCiT holds the class-attention q, k, v in one fused ``qkv`` weight (and bias), so ssl_xcit's
split q/k/v (timm) are clipped as one tensor. Checked against a float64 computation on the fused tensor."""
from __future__ import annotations

import copy

import torch

from ssl_xcit.dino.loss import DINOLoss
from ssl_xcit.dino.optim import param_groups_for_weight_decay
from ssl_xcit.train.loop import build_models
from ssl_xcit.train.step import StepHParams, train_step
from tests.train_helpers import tiny_config


class RecordingSGD(torch.optim.SGD):
    """lr 0: records the gradients the optimizer receives (after clipping) instead of stepping."""

    def step(self, closure=None):
        self.seen = {id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                     if p.grad is not None}


def _dino_clip_(grad: torch.Tensor, clip: float) -> torch.Tensor:
    """dino/utils.py clip_gradients on one tensor."""
    clip_coef = clip / (grad.norm(2) + 1e-6)
    return grad * clip_coef if clip_coef < 1 else grad


def test_class_attention_qkv_is_clipped_as_the_official_fused_tensor(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "run", drop_path_rate=0.0, freeze_last_layer=0)
    torch.manual_seed(0)
    student, teacher = build_models(cfg)
    loss_fn = DINOLoss(cfg.model.out_dim, 4, warmup_teacher_temp=0.04, teacher_temp=0.04,
                       warmup_teacher_temp_epochs=0, nepochs=2)
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    crops += [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]

    # raw gradients of the same step, from copies (the loss copy keeps the centre as it was)
    s_ref, t_ref, loss_ref = copy.deepcopy(student), copy.deepcopy(teacher), copy.deepcopy(loss_fn)
    with torch.no_grad():
        t_out = t_ref(crops[:2])
    loss_ref(s_ref(crops), t_out, 0).backward()
    raw = {n: p.grad.double() for n, p in s_ref.named_parameters() if p.grad is not None}

    blocks = sorted({n.split(".attn.")[0] for n in raw if "cls_attn_blocks" in n and ".attn.q." in n})
    assert len(blocks) == 2          # XCiT's two class-attention blocks
    block0 = [raw[f"{blocks[0]}.attn.{x}.weight"].norm().item() for x in "qkv"]
    clip = min(block0) / 2           # every q/k/v weight is clipped, on its own or fused

    # the reference: fuse q, k, v (weights and biases), clip with DINO's formula in float64, split
    expected = {n: _dino_clip_(gr, clip) for n, gr in raw.items()}
    for block in blocks:
        for kind in ("weight", "bias"):
            names = [f"{block}.attn.{x}.{kind}" for x in "qkv"]
            fused = _dino_clip_(torch.cat([raw[n] for n in names], dim=0), clip)
            for name, part in zip(names, fused.split([raw[n].shape[0] for n in names], dim=0)):
                expected[name] = part
    q0 = f"{blocks[0]}.attn.q.weight"
    assert not torch.allclose(expected[q0], _dino_clip_(raw[q0], clip), rtol=1e-2)   # joint != per parameter

    optimizer = RecordingSGD(param_groups_for_weight_decay(student), lr=0.0)
    hp = StepHParams(lr=0.0, weight_decay=0.0, teacher_momentum=0.996, epoch=0, clip_grad=clip,
                     freeze_last_layer=0)
    train_step(crops, student, teacher, loss_fn, optimizer, None, hp)
    got = {n: optimizer.seen[id(p)].double() for n, p in student.named_parameters() if id(p) in optimizer.seen}
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=2e-5, atol=1e-9, msg=lambda m: f"{name}: {m}")

"""DINOHead: architecture, norms, frozen weight-norm g, last-layer freezing, old checkpoint keys."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_xcit.dino.head import DINOHead, cancel_last_layer_gradients
from ssl_xcit.dino.multicrop import MultiCropForward

G = "last_layer.parametrizations.weight.original0"
V = "last_layer.parametrizations.weight.original1"


def _head(**kw) -> DINOHead:
    torch.manual_seed(0)
    args = dict(in_dim=16, out_dim=50, hidden_dim=32, bottleneck_dim=8)
    args.update(kw)
    return DINOHead(**args)


def test_structure_and_parameter_names():
    head = _head()
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 32), (32, 8)]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    params = dict(head.named_parameters())
    assert params[G].shape == (50, 1) and params[V].shape == (50, 8)
    assert head.last_layer.bias is None
    assert _head(nlayers=1).mlp.out_features == 8
    assert sum(isinstance(m, nn.BatchNorm1d) for m in _head(use_bn=True).mlp) == 2


def test_output_is_cosine_similarity_to_unit_prototypes():
    head = _head()
    x = torch.randn(5, 16, dtype=torch.float64)
    head = head.double()
    out = head(x)
    assert out.shape == (5, 50)
    # independent: normalise the bottleneck and the rows of v by hand
    z = head.mlp(x)
    z = z / z.norm(dim=1, keepdim=True)
    v = dict(head.named_parameters())[V]
    w = v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(out, z @ w.T, rtol=1e-12, atol=1e-12)
    assert out.abs().max() <= 1.0 + 1e-12
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(50, dtype=torch.float64))


def test_init_truncnormal_and_zero_bias():
    torch.manual_seed(0)
    head = DINOHead(in_dim=256, out_dim=10, hidden_dim=512, bottleneck_dim=64)
    for m in head.mlp:
        if isinstance(m, nn.Linear):
            assert torch.count_nonzero(m.bias) == 0
            # trunc_normal_ cuts at +-2 (absolute, as in DINO), i.e. at 100 std: a plain N(0, 0.02)
            assert m.weight.std().item() == pytest.approx(0.02, rel=0.05)
            assert m.weight.mean().abs().item() < 0.002


def test_g_frozen_at_one_when_norm_last_layer():
    head = _head()
    g = dict(head.named_parameters())[G]
    assert not g.requires_grad and torch.all(g == 1)
    v_before = dict(head.named_parameters())[V].detach().clone()
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    head(torch.randn(4, 16)).pow(2).sum().backward()
    opt.step()
    assert torch.all(g == 1)
    assert not torch.equal(v_before, dict(head.named_parameters())[V])
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(50))


def test_g_trainable_without_norm_last_layer():
    head = _head(norm_last_layer=False)
    g = dict(head.named_parameters())[G]
    assert g.requires_grad and torch.all(g == 1)
    head(torch.randn(4, 16)).sum().backward()
    assert g.grad is not None and g.grad.abs().sum() > 0


def test_cancel_last_layer_gradients_freezes_under_adamw():
    torch.manual_seed(1)
    head = _head(norm_last_layer=False)
    model = MultiCropForward(nn.Flatten(), head)  # found inside a wrapper too
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.5)
    last = {n: p.detach().clone() for n, p in head.last_layer.named_parameters()}
    first = head.mlp[0].weight.detach().clone()
    for epoch in range(2):
        opt.zero_grad()
        model([torch.randn(4, 1, 4, 4)]).pow(2).sum().backward()
        assert cancel_last_layer_gradients(model, epoch, freeze_last_layer=2) is True
        assert all(p.grad is None for p in head.last_layer.parameters())
        opt.step()
    for n, p in head.last_layer.named_parameters():
        assert torch.equal(p, last[n]), n  # weight decay did not touch it either
    assert not torch.equal(first, head.mlp[0].weight)
    opt.zero_grad()
    model([torch.randn(4, 1, 4, 4)]).pow(2).sum().backward()
    assert cancel_last_layer_gradients(model, 2, freeze_last_layer=2) is False
    assert all(p.grad is not None for p in head.last_layer.parameters())


def test_cancel_without_head_is_an_error():
    with pytest.raises(ValueError, match="no DINOHead"):
        cancel_last_layer_gradients(nn.Linear(2, 2), 0, 1)


def test_loads_old_weight_norm_keys():
    head = _head()
    sd = head.state_dict()
    old = {k: v for k, v in sd.items() if not k.startswith("last_layer.")}
    old["last_layer.weight_g"] = sd[G] * 2.0
    old["last_layer.weight_v"] = sd[V]
    fresh = _head(out_dim=50)
    fresh.load_state_dict(old)  # strict: every key matched
    x = torch.randn(3, 16)
    torch.testing.assert_close(fresh(x), 2.0 * head(x))


@pytest.mark.parametrize("kw", [dict(in_dim=0), dict(out_dim=-1), dict(nlayers=0), dict(hidden_dim=2.5)])
def test_bad_args(kw):
    with pytest.raises(ValueError, match="positive int"):
        _head(**kw)


def test_normalize_matches_functional():
    head = _head(nlayers=1)
    x = torch.randn(2, 16)
    torch.testing.assert_close(head(x), head.last_layer(F.normalize(head.mlp(x), dim=-1)))

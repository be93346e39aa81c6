"""MultiCropForward: one backbone call per run of equal resolutions, same result as separate calls."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from ssl_xcit.dino.head import DINOHead
from ssl_xcit.dino.multicrop import MultiCropForward, resolution_runs


class CountingBackbone(nn.Module):
    """Resolution-agnostic conv net (no batch statistics) that records every call's input shape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


class CountingHead(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return self.head(x)


def _crops(batch: int, sizes: list[int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, s, s, generator=g) for s in sizes]


def test_resolution_runs():
    shapes = [(2, 3, s, s) for s in (32, 32, 16, 16, 16, 32)]
    assert resolution_runs(shapes) == [(0, 2), (2, 5), (5, 6)]
    assert resolution_runs([(1, 3, 8, 9), (1, 3, 9, 8)]) == [(0, 1), (1, 2)]
    assert resolution_runs([]) == []


@pytest.mark.parametrize("sizes,expected_calls", [
    ([32, 32, 16, 16, 16], [(6, 3, 32, 32), (9, 3, 16, 16)]),
    ([32, 32], [(6, 3, 32, 32)]),
    ([32, 16, 32], [(3, 3, 32, 32), (3, 3, 16, 16), (3, 3, 32, 32)]),
])
def test_one_backbone_call_per_resolution_and_matches_separate_calls(sizes, expected_calls):
    torch.manual_seed(0)
    backbone = CountingBackbone()
    head = CountingHead(DINOHead(8, out_dim=20, hidden_dim=16, bottleneck_dim=4))
    model = MultiCropForward(backbone, head)
    crops = _crops(3, sizes)
    out = model(crops)
    assert backbone.calls == expected_calls
    assert head.calls == [(3 * len(sizes), 8)]
    separate = torch.cat([head.head(backbone(c)) for c in crops])
    assert out.shape == (3 * len(sizes), 20)
    torch.testing.assert_close(out, separate, rtol=1e-5, atol=1e-6)


def test_gradients_flow_to_every_crop():
    model = MultiCropForward(CountingBackbone(), DINOHead(8, out_dim=10, hidden_dim=16, bottleneck_dim=4))
    crops = [c.requires_grad_() for c in _crops(2, [16, 16, 8])]
    model(crops).sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in crops)


def test_real_xcit_backbone_eval_mode():
    """With a classifier-less timm XCiT (BatchNorm in eval mode) grouping changes nothing."""
    torch.manual_seed(0)
    backbone = timm.create_model("xcit_nano_12_p16_224", pretrained=False, num_classes=0).eval()
    model = MultiCropForward(backbone, DINOHead(backbone.num_features, out_dim=32, hidden_dim=64,
                                                bottleneck_dim=16)).eval()
    crops = _crops(2, [32, 32, 16])
    calls = []
    handle = backbone.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
    with torch.no_grad():
        out = model(crops)
        separate = torch.cat([model.head(backbone(c)) for c in crops])
    handle.remove()
    assert calls[:2] == [(4, 3, 32, 32), (2, 3, 16, 16)]
    torch.testing.assert_close(out, separate, rtol=1e-4, atol=1e-5)


def test_bad_inputs():
    model = MultiCropForward(CountingBackbone(), nn.Identity())
    with pytest.raises(ValueError, match="empty"):
        model([])
    with pytest.raises(ValueError, match="same B"):
        model([torch.randn(2, 3, 8, 8), torch.randn(3, 3, 8, 8)])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model([torch.randn(3, 8, 8)])
    bad = MultiCropForward(nn.Identity(), nn.Identity())
    with pytest.raises(ValueError, match="num_classes=0"):
        bad([torch.randn(2, 3, 8, 8)])


def test_single_tensor_accepted():
    model = MultiCropForward(CountingBackbone(), nn.Identity())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), model([x]))


def test_torch_compile_fullgraph():
    """No graph breaks: the grouping is shape-only Python control flow."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = MultiCropForward(backbone, DINOHead(8, out_dim=10, hidden_dim=16, bottleneck_dim=4))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    crops = _crops(2, [16, 16, 8, 8, 8])
    torch.testing.assert_close(compiled(crops), model(crops), rtol=1e-5, atol=1e-6)

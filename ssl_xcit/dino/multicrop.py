"""Student / teacher forward over a list of crop batches of mixed resolution.

Crops of one resolution go through the backbone together (one call per run of consecutive crops
of equal size, i.e. one for the globals and one for the locals), which keeps the batch large
and the number of kernel launches small. The head then runs once on all features, since its
input no longer depends on the resolution.

Output rows are crop-major: rows ``[i*B, (i+1)*B)`` belong to crop ``i`` -- the layout
:class:`ssl_xcit.dino.loss.DINOLoss` expects. The grouping depends only on the shapes, so
``torch.compile`` sees static Python control flow (one graph per crop-size pattern).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def resolution_runs(shapes: Sequence[torch.Size | tuple[int, ...]]) -> list[tuple[int, int]]:
    """``[start, end)`` index ranges of consecutive crops with equal spatial size (H, W)."""
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(shapes) + 1):
        if i == len(shapes) or tuple(shapes[i][-2:]) != tuple(shapes[start][-2:]):
            runs.append((start, i))
            start = i
    return runs


class MultiCropForward(nn.Module):
    """``forward(crops) -> head(backbone(crops))`` with crops grouped by resolution.

    ``backbone`` must map ``(N, C, H, W)`` images to ``(N, D)`` features (a classifier-less
    XCiT returns its class token); ``head`` maps ``(N, D)`` to ``(N, K)``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Sequence[torch.Tensor] | torch.Tensor,
                return_features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Head outputs, crop-major; with ``return_features`` also the backbone's features (same
        rows), for terms on them such as KoLeo (an argument, so that a DDP wrapper passes it on)."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        if len(crops) == 0:
            raise ValueError("MultiCropForward got an empty list of crops")
        batch = crops[0].shape[0]
        for i, c in enumerate(crops):
            if c.ndim != 4 or c.shape[0] != batch:
                raise ValueError(f"MultiCropForward: crop {i} has shape {tuple(c.shape)}; every crop "
                                 f"must be (B, C, H, W) with the same B={batch}")
        feats = []
        for start, end in resolution_runs([c.shape for c in crops]):
            group = crops[start] if end - start == 1 else torch.cat(list(crops[start:end]), dim=0)
            out = self.backbone(group)
            if out.ndim != 2:
                raise ValueError(f"MultiCropForward: backbone returned shape {tuple(out.shape)}; "
                                 "expected (N, D) features (build it with num_classes=0)")
            feats.append(out)
        features = feats[0] if len(feats) == 1 else torch.cat(feats, dim=0)
        out = self.head(features)
        return (out, features) if return_features else out

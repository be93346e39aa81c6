"""Dense (per-patch) feature maps of an XCiT, in the shape detection and segmentation necks take.

Why: XCiT's cross-covariance attention is linear in the number of tokens, so it runs at 480p and
beyond, and the XCiT paper's dense results (COCO, ADE20k) read the patch tokens of XCA blocks
[3, 5, 7, 11] (depth 12; [7, 11, 15, 23] at depth 24). :class:`DenseFeatures` returns one
(B, C, H/p, W/p) map per chosen block, at any input size divisible by the patch, as timm's
``features_only=True`` does (the computation is timm's own ``Xcit.forward_intermediates``), plus
one more choice timm has not: :data:`FINAL`, the final normed patch tokens (after the
class-attention blocks and the last LayerNorm: what DINO's ViT code calls the patch tokens).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

FINAL = "final"  # the final normed patch tokens, as an entry of ``out_indices``
OutIndex = Union[int, str]


def default_out_indices(depth: int) -> tuple[int, ...]:
    """The XCiT paper's blocks for dense heads: [3, 5, 7, 11] at depth 12, [7, 11, 15, 23] at 24;
    other depths: the same fractions (1/3, 1/2, 2/3, 1) of the depth."""
    if depth == 12:
        return (3, 5, 7, 11)
    if depth == 24:
        return (7, 11, 15, 23)
    return tuple(sorted({max(0, round(depth * f) - 1) for f in (1 / 3, 1 / 2, 2 / 3, 1.0)}))


def normalize_out_indices(out_indices: Sequence[OutIndex] | OutIndex, depth: int) -> tuple[OutIndex, ...]:
    """Block indices in [0, depth) (negative ones count from the end, as in Python) or :data:`FINAL`;
    a ValueError names the valid range."""
    items = (out_indices,) if isinstance(out_indices, (int, str)) else tuple(out_indices)
    if not items:
        raise ValueError("out_indices is empty: give at least one XCA block index or 'final'")
    out: list[OutIndex] = []
    for i in items:
        if isinstance(i, str) and i.strip().lower() in (FINAL, "norm", "-0"):
            out.append(FINAL)
            continue
        try:
            j = int(i)
        except (TypeError, ValueError):
            raise ValueError(f"out_indices entry {i!r} is neither a block index nor {FINAL!r}") from None
        if not -depth <= j < depth:
            raise ValueError(f"out_indices entry {j} is out of range: this XCiT has {depth} XCA blocks "
                             f"(0..{depth - 1}, or -1..-{depth} from the end), or {FINAL!r}")
        out.append(j % depth)
    return tuple(out)


class DenseFeatures(nn.Module):
    """An XCiT's feature maps: ``forward(x)`` returns a list of (B, C, H/p, W/p) tensors, one per
    entry of ``out_indices`` (in that order).

    ``feature_info`` is timm's :class:`~timm.models.FeatureInfo` over the chosen maps
    (``channels()``, ``reduction()``, ``module_name()``), so necks built from timm backbones
    work unchanged. Entry ``i`` is the output of XCA block ``i`` (``blocks.i``), un-normed, as
    timm's ``features_only=True`` gives it; :data:`FINAL` is the final normed patch tokens
    (``norm``). The wrapped model is ``self.model`` (its weights are shared, not copied).
    """

    def __init__(self, model: nn.Module, out_indices: Sequence[OutIndex] | OutIndex | None = None) -> None:
        super().__init__()
        from timm.models import FeatureInfo
        depth = len(model.blocks)
        self.model = model
        self.out_indices = normalize_out_indices(
            default_out_indices(depth) if out_indices is None else out_indices, depth)
        reduction = int(model.patch_embed.patch_size)
        info = [dict(num_chs=int(model.embed_dim), reduction=reduction,
                     module="norm" if i == FINAL else f"blocks.{i}") for i in self.out_indices]
        self.feature_info = FeatureInfo(info, out_indices=tuple(range(len(info))))

    @property
    def patch_size(self) -> int:
        return int(self.model.patch_embed.patch_size)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        check = getattr(self.model, "check_input", None)
        if callable(check):
            check(x)
        blocks = sorted({i for i in self.out_indices if i != FINAL})
        want_final = FINAL in self.out_indices
        b, _, h, w = x.shape
        hp, wp = h // self.patch_size, w // self.patch_size
        if want_final:
            taken = blocks or [len(self.model.blocks) - 1]   # timm needs one index; unused then
            final, maps = self.model.forward_intermediates(x, indices=taken, output_fmt="NCHW")
            final_map = final[:, 1:].reshape(b, hp, wp, -1).permute(0, 3, 1, 2).contiguous()
        else:
            maps = self.model.forward_intermediates(x, indices=blocks, stop_early=True, output_fmt="NCHW",
                                                    intermediates_only=True)
        by_index = dict(zip(blocks, maps))  # timm returns them in block order
        return [final_map if i == FINAL else by_index[i] for i in self.out_indices]


def dense_features(model: nn.Module, out_indices: Sequence[OutIndex] | OutIndex | None = None) -> DenseFeatures:
    """``model``'s feature maps at ``out_indices`` (default: the XCiT paper's, see
    :func:`default_out_indices`); see :class:`DenseFeatures`."""
    return DenseFeatures(model, out_indices)


__all__ = ["FINAL", "DenseFeatures", "dense_features", "default_out_indices", "normalize_out_indices"]

"""XCiT's self-attention maps as arrays: where the CLS token looks, per head (DINO's Fig. 1 for XCiT).

Where XCiT's spatial attention is. Its XCA blocks attend across *channels* (a d x d covariance per
head), so they hold no token-to-token map. The CLS token is added after them and only the
class-attention blocks (2 in every published XCiT) let it look at the patch tokens: per head, the
softmax over the 1 + N keys (the CLS itself, then the N patches in row-major order) of the CLS query.
That row is what DINO's ``visualize_attention.py`` shows for ViT, and what this module returns.

What is returned (:class:`AttentionMaps`, one per image):

* ``heads`` (nh, Hp, Wp): each head's CLS->patch attention on the patch grid, renormalised over the
  N patches (the softmax also gives the CLS some weight on itself; that share is ``cls_self``), so
  every map sums to 1 and maps of different heads and checkpoints compare on one scale;
* ``mean`` (Hp, Wp): the mean over heads (sums to 1 as well);
* ``head_masks`` / ``mean_mask``: DINO's thresholded masks, the smallest set of patches holding
  ``threshold`` (0.6) of a map's mass (:func:`threshold_mask`);
* :meth:`AttentionMaps.upsample`: a grid map on the image's pixels (each patch a p x p block, as
  DINO's nearest upsampling).

The maps are computed from the model's own forward pass: a hook reads the normed tokens that the
chosen class-attention layer receives, and its own ``q``, ``k`` and ``scale`` give the softmax.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssl_xcit.errors import UserError

DEFAULT_THRESHOLD = 0.6


class ImageReadError(UserError, ValueError):
    """An image file that cannot be opened or decoded; the message names it."""


@dataclass
class AttentionMaps:
    """The attention of one image (see the module doc). ``image`` is what the model saw, uint8 RGB."""

    heads: np.ndarray        # (nh, Hp, Wp) float32, each sums to 1 over the patches
    cls_self: np.ndarray     # (nh,) attention the CLS query put on itself (left out of ``heads``)
    patch_size: int
    layer: int               # index of the class-attention block, counted from 0
    threshold: float
    image: np.ndarray | None = None   # (H, W, 3) uint8, H = Hp * p, W = Wp * p

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.heads.shape[1]), int(self.heads.shape[2])

    @property
    def mean(self) -> np.ndarray:
        return self.heads.mean(axis=0)

    @property
    def head_masks(self) -> np.ndarray:
        return np.stack([threshold_mask(h, self.threshold) for h in self.heads])

    @property
    def mean_mask(self) -> np.ndarray:
        return threshold_mask(self.mean, self.threshold)

    def upsample(self, grid_map: np.ndarray) -> np.ndarray:
        """(Hp, Wp) -> (Hp * p, Wp * p): every patch value repeated over its p x p pixels."""
        p = self.patch_size
        return np.repeat(np.repeat(np.asarray(grid_map), p, axis=-2), p, axis=-1)


def threshold_mask(attention: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """DINO's mask: the smallest set of positions whose attention holds ``threshold`` of the total.

    Positions are taken from the largest value down until their sum reaches ``threshold`` of the
    mass (float64), as DINO's ``visualize_attention.py`` does; the result has ``attention``'s shape.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    a = np.asarray(attention, dtype=np.float64)
    flat = a.reshape(-1)
    if flat.size == 0 or flat.min() < 0 or not np.isfinite(flat).all() or flat.sum() <= 0:
        raise ValueError("attention must be finite, non-negative and not all zero")
    order = np.argsort(-flat, kind="stable")
    cum = np.cumsum(flat[order]) / flat.sum()
    n_keep = min(int(np.searchsorted(cum, threshold, side="left")) + 1, flat.size)
    mask = np.zeros(flat.size, dtype=bool)
    mask[order[:n_keep]] = True
    return mask.reshape(a.shape)


def _class_attention_blocks(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "cls_attn_blocks", None)
    if blocks is None or len(blocks) == 0:
        raise TypeError(f"{type(model).__name__} has no class-attention blocks (cls_attn_blocks): "
                        "attention maps need an XCiT")
    return list(blocks)


def resolve_layer(model: nn.Module, layer: int = -1) -> int:
    """``layer`` (negative counts from the end) as a block index, with an error naming the range."""
    n = len(_class_attention_blocks(model))
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
        raise ValueError(f"this XCiT has {n} class-attention layers: the layer must be in [{-n}, {n - 1}] "
                         f"(-1 is the last), got {layer!r}")
    return layer % n


@torch.no_grad()
def cls_attention(model: nn.Module, images: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """Softmax rows of the CLS query in class-attention block ``layer``: (B, heads, 1 + N) float32.

    Index 0 of the last axis is the CLS itself, then the patches in row-major order; rows sum to 1.
    The model runs its normal forward (eval mode is the caller's choice); a forward pre-hook on the
    block's attention reads the normed tokens it receives.
    """
    attn = _class_attention_blocks(model)[resolve_layer(model, layer)].attn
    seen: list[torch.Tensor] = []
    handle = attn.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        model.forward_features(images)
    finally:
        handle.remove()
    tokens = seen[-1].float()
    b, n, c = tokens.shape
    h = attn.num_heads
    q = F.linear(tokens[:, :1], attn.q.weight.float(), _float(attn.q.bias))
    k = F.linear(tokens, attn.k.weight.float(), _float(attn.k.bias))
    q = q.reshape(b, 1, h, c // h).transpose(1, 2)      # (B, h, 1, d)
    k = k.reshape(b, n, h, c // h).transpose(1, 2)      # (B, h, N+1, d)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    return logits.softmax(dim=-1).squeeze(2)


def patch_size_of(model: nn.Module) -> int:
    """The side in pixels of one patch (our XCiT's ``patch_size``, timm's ``patch_embed.patch_size``)."""
    p = getattr(model, "patch_size", None) or model.patch_embed.patch_size
    return int(p[0] if isinstance(p, (tuple, list)) else p)


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def attention_maps(model: nn.Module, images: torch.Tensor, layer: int = -1,
                   threshold: float = DEFAULT_THRESHOLD, pictures: list[np.ndarray] | None = None
                   ) -> list[AttentionMaps]:
    """One :class:`AttentionMaps` per image of the normalised batch ``images`` (B, 3, H, W).

    H and W must be multiples of the patch size (the model checks). ``pictures`` (uint8 RGB
    arrays, e.g. from :func:`load_image`) are attached to the results for overlays.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    p = patch_size_of(model)
    rows = cls_attention(model, images, layer).double().cpu()
    hp, wp = images.shape[-2] // p, images.shape[-1] // p
    patches = rows[:, :, 1:]
    patches = patches / patches.sum(dim=-1, keepdim=True)
    out = []
    for i in range(images.shape[0]):
        out.append(AttentionMaps(
            heads=patches[i].reshape(-1, hp, wp).float().numpy(), cls_self=rows[i, :, 0].float().numpy(),
            patch_size=p, layer=resolve_layer(model, layer), threshold=threshold,
            image=None if pictures is None else pictures[i]))
    return out


def read_picture(path: str | Path):
    """An image file decoded as RGB by the data layer's reader (:func:`ssl_xcit.data.common.load_rgb`:
    16-bit greys scaled, truncated files refused); an undecodable file is an :class:`ImageReadError`
    naming it, a missing one stays a ``FileNotFoundError``."""
    from ssl_xcit.data.common import DECODE_ERRORS, load_rgb
    try:
        return load_rgb(path)
    except DECODE_ERRORS as err:
        if isinstance(err, (FileNotFoundError, IsADirectoryError, PermissionError)):
            raise
        raise ImageReadError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None


def load_image(path: str | Path, image_size: int | tuple[int, int] | None, patch_size: int,
               mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, np.ndarray]:
    """An image file as ``(normalised tensor (3, H, W), uint8 RGB array (H, W, 3))``: :func:`read_picture`
    then :func:`prepare_image`."""
    return prepare_image(read_picture(path), image_size, patch_size, mean, std, name=str(path))


def prepare_image(rgb, image_size: int | tuple[int, int] | None, patch_size: int, mean: tuple[float, ...],
                  std: tuple[float, ...], name: str = "image") -> tuple[torch.Tensor, np.ndarray]:
    """A decoded RGB PIL image as ``(normalised tensor (3, H, W), uint8 RGB array (H, W, 3))``.

    ``image_size``: ``None`` keeps the image's size, an int resizes the shorter side to it (aspect
    kept), ``(H, W)`` resizes to exactly that (bicubic). The result is then centre-cropped to the
    largest multiple of ``patch_size`` in each direction, so every pixel shown lies in a patch.
    """
    from PIL import Image
    if image_size is not None:
        w, h = rgb.size
        if isinstance(image_size, int):
            scale = image_size / min(w, h)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
        else:
            size = (int(image_size[1]), int(image_size[0]))
        rgb = rgb.resize(size, Image.BICUBIC)
    w, h = rgb.size
    cw, ch = w // patch_size * patch_size, h // patch_size * patch_size
    if cw == 0 or ch == 0:
        raise ImageReadError(f"{name}: {w}x{h} pixels is smaller than one {patch_size}-pixel patch; "
                             "pass a larger image size")
    left, top = (w - cw) // 2, (h - ch) // 2
    picture = np.asarray(rgb.crop((left, top, left + cw, top + ch)), dtype=np.uint8).copy()
    tensor = torch.from_numpy(picture).permute(2, 0, 1).float().div(255.0)
    tensor = (tensor - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return tensor, picture

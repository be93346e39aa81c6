"""XCiT on top of timm's port, with the feature access DINO and the evaluation tools need.

timm's ``Xcit`` computes exactly the published architecture (its outputs are the reference our
tests compare with); this subclass adds nothing to the computation, only:

* input checks with clear errors (any H, W divisible by the patch size works: 96-px local crops,
  224, 384, non-square; the Fourier positional encoding is computed per input, so no interpolation;
  an integer batch, e.g. uint8 as decoded, is told to be converted and normalised);
* :meth:`XCiT.extract_feat`: the final normed CLS feature (B, D) that DINO heads and k-NN use;
* :meth:`XCiT.forward_features_all`: every useful token set from one pass;
* :meth:`XCiT.get_intermediate_layers`: DINO-style "last n blocks" access (see below);
* :meth:`XCiT.get_last_cls_attention`: the class-attention map of the last block (attention maps).

What "the last n blocks" means for XCiT. XCiT has ``depth`` XCA blocks that see patch tokens only,
then (2) class-attention blocks: the CLS token is created *after* the XCA blocks and is only updated
by the class-attention blocks. So the CLS token has one value per class-attention block, and "the
CLS of the last n blocks" is the CLS after each of the last n class-attention blocks, each passed
through the final LayerNorm (as DINO's ViT ``get_intermediate_layers`` applies the final norm to
every returned block). n is at most the number of class-attention blocks (2); n = 1 is the
usual final feature. The XCA blocks' outputs have no CLS; use ``xca_tokens`` for them.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from ssl_xcit.data.common import IMAGENET_MEAN, IMAGENET_STD
from timm.models.xcit import Xcit
from torch.utils.checkpoint import checkpoint


class XCiT(Xcit):
    """timm's XCiT with named feature access; ``num_classes=0`` makes a backbone whose forward
    returns the final normed CLS feature (B, embed_dim).

    Extra attributes: ``arch`` (architecture name), ``zoo_name`` (the name the model was built
    from), ``img_size`` (default evaluation resolution), ``patch_size``, ``embed_dim``,
    ``num_heads``, ``data_config`` (preprocessing of the published weights).
    """

    def __init__(self, *, arch: str = "xcit", zoo_name: str | None = None,
                 img_size: int | tuple[int, int] = 224, patch_size: int = 16, num_heads: int = 12,
                 **kwargs: Any) -> None:
        if patch_size not in (8, 16):
            raise ValueError(f"XCiT's convolutional patch embedding supports patch_size 8 or 16, "
                             f"got patch_size={patch_size}")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if len(size) != 2 or any(s <= 0 or s % patch_size for s in size):
            raise ValueError(f"img_size={img_size} must be positive and divisible by the patch "
                             f"size {patch_size}")
        super().__init__(img_size=size, patch_size=patch_size, num_heads=num_heads, **kwargs)
        self.arch = arch
        self.zoo_name = zoo_name or arch
        self.img_size: tuple[int, int] = size
        self.num_heads = num_heads
        # timm's data-config helpers (timm.data.resolve_model_data_config) read pretrained_cfg
        self.pretrained_cfg = dict(self.data_config, fixed_input_size=False)

    # ------------------------------------------------------------------ properties
    @property
    def patch_size(self) -> int:
        return int(self.patch_embed.patch_size)

    @property
    def num_cls_blocks(self) -> int:
        return 0 if self.cls_attn_blocks is None else len(self.cls_attn_blocks)

    @property
    def data_config(self) -> dict:
        """Evaluation preprocessing of the published XCiT weights: bicubic resize of the short side
        to ``img_size`` (crop ratio 1.0), centre crop, ImageNet mean / std."""
        return {"input_size": (self.in_chans, *self.img_size), "interpolation": "bicubic",
                "crop_pct": 1.0, "mean": IMAGENET_MEAN,
                "std": IMAGENET_STD}

    # ------------------------------------------------------------------ checks
    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless ``x`` is (B, in_chans, H, W) with H, W divisible by the patch,
        TypeError for integer images (uint8 as decoded): they need converting and normalising.

        Python-level checks of dtype and shape only: no host sync, no graph break under
        torch.compile."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self.arch}: expected an image batch (B, {self.in_chans}, H, W), "
                             f"got {shape}")
        if not x.is_floating_point():
            mean = IMAGENET_MEAN
            std = IMAGENET_STD
            raise TypeError(f"{self.arch}: expected a float image batch, got {x.dtype}; convert and "
                            f"normalise it first, e.g. x = (x.float() / 255 - mean) / std with the "
                            f"ImageNet mean {mean} and std {std} per channel")
        _, c, h, w = x.shape
        if c != self.in_chans:
            raise ValueError(f"{self.arch}: expected {self.in_chans} input channels, got {c} "
                             f"(input shape {tuple(x.shape)})")
        p = self.patch_size
        if h % p or w % p or h == 0 or w == 0:
            raise ValueError(f"{self.arch}: input size {h}x{w} is not divisible by the patch size "
                             f"{p}; resize or crop to a multiple of {p} (e.g. "
                             f"{max(p, h // p * p)}x{max(p, w // p * p)})")

    # ------------------------------------------------------------------ timm API, checked
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return super().forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes), or the final normed CLS feature (B, D) when num_classes=0."""
        self.check_input(x)
        return super().forward(x)

    def extract_feat(self, x: torch.Tensor) -> torch.Tensor:
        """The final normed CLS feature (B, D): what DINO heads, k-NN and linear probes use."""
        return self.forward_features(x)[:, 0]

    # ------------------------------------------------------------------ all features
    def _xca_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch embedding + positional encoding + XCA blocks (the part before the CLS exists)."""
        b = x.shape[0]
        x, (hp, wp) = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed(b, hp, wp).reshape(b, -1, x.shape[1]).permute(0, 2, 1)
        x = self.pos_drop(x)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, hp, wp, use_reentrant=False)
            else:
                x = blk(x, hp, wp)
        return x, (hp, wp)

    def _cls_blocks(self, x: torch.Tensor, stop: int | None = None) -> tuple[torch.Tensor, list]:
        """Attach the CLS token and run class-attention blocks [0, stop); return the token tensor
        after the last block run and the token tensors after each block."""
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        outs = []
        for blk in list(self.cls_attn_blocks)[:stop]:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            outs.append(x)
        return x, outs

    def forward_features_all(self, x: torch.Tensor) -> dict[str, Any]:
        """Every token set from one forward pass.

        Returns a dict:
          ``cls``          (B, D)    final normed CLS token (== :meth:`extract_feat`);
          ``cls_blocks``   list of (B, D), one per class-attention block, oldest first, each through
                           the final norm (the last equals ``cls``);
          ``patch_tokens`` (B, N, D) final normed patch tokens (after the class-attention blocks
                           and the final norm; their mean is timm's ``global_pool='avg'`` feature);
          ``xca_tokens``   (B, N, D) output of the last XCA block (un-normed, before the CLS is
                           attached): the patch representation proper, e.g. for dense export;
          ``grid``         (Hp, Wp)  patch grid; N = Hp * Wp, tokens in row-major order.
        """
        self.check_input(x)
        xca, grid = self._xca_tokens(x)
        last, per_block = self._cls_blocks(xca)
        normed = self.norm(last)
        cls_blocks = [self.norm(t[:, 0]) for t in per_block[:-1]] + [normed[:, 0]]
        return {"cls": normed[:, 0], "cls_blocks": cls_blocks, "patch_tokens": normed[:, 1:],
                "xca_tokens": xca, "grid": grid}

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """DINO-style access: the full token tensors (B, 1+N, D) after each of the last ``n``
        class-attention blocks, each through the final norm, oldest first. ``[:, 0]`` of each is
        the CLS of that block; ``n`` is at most the number of class-attention blocks (see the
        module docstring for why)."""
        k = self.num_cls_blocks
        if not isinstance(n, int) or not 1 <= n <= k:
            raise ValueError(
                f"{self.arch}: n={n!r} last blocks requested, but XCiT's CLS token only exists in "
                f"its {k} class-attention blocks, so 1 <= n <= {k}; the {len(self.blocks)} XCA "
                f"blocks carry patch tokens only (forward_features_all()['xca_tokens'])")
        self.check_input(x)
        xca, _ = self._xca_tokens(x)
        _, per_block = self._cls_blocks(xca)
        return [self.norm(t) for t in per_block[-n:]]

    def get_last_cls_tokens(self, x: torch.Tensor, n: int = 1) -> torch.Tensor:
        """The CLS tokens of the last ``n`` class-attention blocks, normed, concatenated: (B, n*D)
        (DINO's linear-evaluation feature; n=1 is :meth:`extract_feat`)."""
        return torch.cat([t[:, 0] for t in self.get_intermediate_layers(x, n)], dim=-1)

    @torch.no_grad()
    def get_last_cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights of the CLS query in the last class-attention block: (B, heads, 1+N).

        Index 0 is the CLS attending to itself; ``[:, :, 1:]`` reshaped to (Hp, Wp) gives the
        attention maps DINO visualises. Rows sum to 1 (softmax over 1+N keys).
        """
        self.check_input(x)
        xca, _ = self._xca_tokens(x)
        tokens, _ = self._cls_blocks(xca, stop=self.num_cls_blocks - 1)
        blk = self.cls_attn_blocks[-1]
        y = blk.norm1(tokens)
        b, n, c = y.shape
        h = blk.attn.num_heads
        q = blk.attn.q(y[:, 0]).reshape(b, h, 1, c // h)
        k = blk.attn.k(y).reshape(b, n, h, c // h).transpose(1, 2)
        logits = (q * blk.attn.scale) @ k.transpose(-2, -1)
        return F.softmax(logits.float(), dim=-1).squeeze(2)

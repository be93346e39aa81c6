"""The frozen backbone an evaluation reads, and the outputs a k-NN, a linear probe or an export
can ask of it (:func:`backbone_outputs`):

* ``cls``: the final, normed CLS feature (B, D) -- what ``model(x)`` returns and what DINO's k-NN
  and DINO's XCiT linear probe use.
* ``last_blocks``: the CLS token after each of the last ``n`` blocks that carry one, each passed
  through the final norm, concatenated (B, n*D). In XCiT only the class-attention blocks (2 in
  every published XCiT) carry a CLS token, so ``n`` is at most 2 there; ``n = 1`` equals ``cls``.
* ``avgpool``: the mean of the final normed patch tokens (B, D).
* ``patch``: the final normed patch tokens (B, P, D).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from ssl_xcit.errors import SETTING, named
from ssl_xcit.evaluate.inputs import EvalInputError

OUTPUT_NAMES = ("cls", "last_blocks", "avgpool", "patch")


def load_frozen_backbone(checkpoint: str, arch: str | None = None, checkpoint_key: str = "teacher",
                         device: torch.device | str = "cpu", seed: int = 0,
                         crop_size: int | None = None) -> nn.Module:
    """The backbone in eval mode with gradients off: evaluation never changes its weights.

    A model name gives a random-init backbone drawn from ``seed`` alone (the caller's random
    state is left untouched), so every rank and every resumed run evaluates the same network.
    ``crop_size`` is checked against the backbone's patch size before any image is read.
    """
    from ssl_xcit.models import load_backbone
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = load_backbone(checkpoint, arch=arch, checkpoint_key=checkpoint_key)
    patch = getattr(model, "patch_size", None)
    if crop_size is not None and isinstance(patch, int) and crop_size % patch:
        raise named(EvalInputError, f"{SETTING} {crop_size} is not divisible by the patch size {patch} of "
                    f"{getattr(model, 'arch', type(model).__name__)}: use a multiple of {patch} "
                    f"(e.g. {max(patch, crop_size // patch * patch)})", "crop_size")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device)


def embed_dim(model: nn.Module) -> int:
    for attr in ("embed_dim", "num_features"):
        value = getattr(model, attr, None) or getattr(_token_core(model, required=False), attr, None)
        if isinstance(value, int):
            return value
    raise AttributeError(f"{type(model).__name__} exposes neither embed_dim nor num_features")


def _token_core(model: nn.Module, required: bool = True) -> nn.Module | None:
    """The module that holds the transformer (``forward_features``, ``norm``, ``blocks``).

    Searched rather than assumed, so a wrapper around a timm/official XCiT or a DINO ViT works.
    """
    for m in (model, *model.modules()):
        if (callable(getattr(m, "forward_features", None)) and isinstance(getattr(m, "norm", None), nn.Module)
                and isinstance(getattr(m, "blocks", None), nn.Sequential | nn.ModuleList)):
            return m
    if required:
        raise TypeError(f"{type(model).__name__} has no transformer with forward_features/norm/blocks: "
                        "only the 'cls' output (model(x)) is available for it")
    return None


def _cls_blocks(core: nn.Module) -> Sequence[nn.Module]:
    """Blocks whose output carries a CLS token at position 0."""
    cab = getattr(core, "cls_attn_blocks", None)
    if cab is not None and len(cab) > 0:
        return list(cab)  # XCiT: the patch blocks have no CLS token
    return list(core.blocks)  # ViT: every block does


def max_last_blocks(model: nn.Module) -> int:
    return len(_cls_blocks(_token_core(model)))


def check_n_last_blocks(model: nn.Module, n: int) -> None:
    """``n_last_blocks=n`` fits the backbone: checked once it is loaded, before any image is read (the
    forward pass would otherwise fail on the first batch, with a traceback)."""
    most = max_last_blocks(model)
    if not 1 <= n <= most:
        arch = getattr(model, "arch", type(model).__name__)
        raise named(EvalInputError, f"{SETTING} {n}: this backbone ({arch}) has {most} block(s) carrying a CLS "
                    f"token (XCiT: its class-attention blocks), so give at most {most}", "n_last_blocks")


def backbone_outputs(model: nn.Module, images: torch.Tensor, names: Iterable[str],
                     n_last_blocks: int = 1) -> dict[str, torch.Tensor]:
    """The outputs ``names`` (see module doc) of one forward pass, without gradients."""
    names = tuple(names)
    bad = [n for n in names if n not in OUTPUT_NAMES]
    if bad:
        raise ValueError(f"unknown backbone output(s) {bad}; choose from {OUTPUT_NAMES}")
    with torch.no_grad():
        if set(names) <= {"cls"}:
            return {"cls": _as_features(model(images), model)}
        core = _token_core(model)
        blocks = _cls_blocks(core)
        want_blocks = "last_blocks" in names
        if want_blocks and not 1 <= n_last_blocks <= len(blocks):
            raise ValueError(f"n_last_blocks={n_last_blocks} but this backbone has {len(blocks)} block(s) "
                             "carrying a CLS token (XCiT: its class-attention blocks)")
        if callable(getattr(core, "forward_features_all", None)):  # ssl_xcit.models.XCiT: one pass, named
            return _from_all(core.forward_features_all(images), names, n_last_blocks)
        captured: list[torch.Tensor] = []
        hooks = []
        if want_blocks:
            for blk in blocks[len(blocks) - n_last_blocks:]:
                hooks.append(blk.register_forward_hook(
                    lambda _m, _i, out: captured.append(out[:, 0])))
        try:
            tokens = core.forward_features(images)
        finally:
            for h in hooks:
                h.remove()
        if tokens.dim() != 3:
            raise TypeError(f"{type(core).__name__}.forward_features returned shape {tuple(tokens.shape)}; "
                            "expected tokens (B, 1+P, D)")
        prefix = int(getattr(core, "num_prefix_tokens", 1))
        out: dict[str, torch.Tensor] = {}
        if "cls" in names:
            out["cls"] = tokens[:, 0]
        if want_blocks:
            out["last_blocks"] = torch.cat([core.norm(c) for c in captured], dim=-1)
        if "avgpool" in names:
            out["avgpool"] = tokens[:, prefix:].mean(dim=1)
        if "patch" in names:
            out["patch"] = tokens[:, prefix:]
        return out


def _from_all(feats: dict, names: tuple[str, ...], n_last_blocks: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if "cls" in names:
        out["cls"] = feats["cls"]
    if "last_blocks" in names:
        out["last_blocks"] = torch.cat(list(feats["cls_blocks"][-n_last_blocks:]), dim=-1)
    if "avgpool" in names:
        out["avgpool"] = feats["patch_tokens"].mean(dim=1)
    if "patch" in names:
        out["patch"] = feats["patch_tokens"]
    return out


def _as_features(out: object, model: nn.Module) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise TypeError(f"{type(model).__name__}(x) must return the CLS feature (B, D), got "
                        f"{getattr(out, 'shape', type(out).__name__)}")
    return out

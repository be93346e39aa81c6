"""Reading XCiT checkpoints of every origin into this package's (timm's) key names.

Why: the same weights circulate under four key namings and five wrappers. Everything is turned into
one plain state dict in timm's naming (the naming of :class:`ssl_xcit.models.xcit.XCiT`), then loaded
strictly, so a wrong file or a wrong architecture fails loudly instead of half-loading.

Formats (``format=``, or ``'auto'`` to detect):

==============  ===========================================================================
official        facebookresearch/xcit files: ``{'model': sd, ...}``; ``pos_embeder.*``, class-
                attention ``qkv`` fused in one Linear.
dino_backbone   plain state dict of a DINO XCiT backbone (official naming, no head).
dino            DINO training checkpoint: ``{'student': sd, 'teacher': sd, 'args': Namespace}``,
                keys ``module.``/``backbone.``-prefixed; ``head.*`` (the DINO head) is dropped;
                ``checkpoint_key`` picks student or teacher (default teacher).
ssl_xcit        this project's checkpoints: ``{'format': 'ssl_xcit', 'student', 'teacher',
                'config': {'model': {'arch': ...}}}``; read like ``dino``.
timm            plain state dict in timm's naming (also ``.safetensors`` files).
mmpretrain      ``{'state_dict': sd, 'meta': ...}``; ``backbone.``-prefixed, ``xca_layers``,
                ``ca_layers``, ``ffn.layers``, ``ConvModule`` ``conv``/``bn`` wrappers,
                ``head.fc``.
==============  ===========================================================================

Files are read with ``torch.load(weights_only=True)``, allowing ``argparse.Namespace`` (the
``args`` of official DINO / XCiT files); anything else that needs unpickling code is refused unless
``allow_pickle=True``.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .zoo import ARCHS
from ssl_xcit.errors import UserError, hinted

log = logging.getLogger(__name__)

FORMATS = ("official", "dino_backbone", "dino", "ssl_xcit", "timm", "mmpretrain")
HEAD_KEYS = ("head.weight", "head.bias")


class CheckpointError(UserError, ValueError, RuntimeError):
    """A checkpoint that cannot be read or does not fit the model or run; the message names the file.

    The one class for every checkpoint error of the project (model loading here, a training's resume in
    :mod:`ssl_xcit.engine.checkpoint`, which re-exports it): a ``ValueError`` and a ``RuntimeError``,
    the two its callers caught before there was one.
    """


# ---------------------------------------------------------------------------------- reading
def require_checkpoint_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path when it is an existing file; a clear error for a missing one or a folder
    (a training output folder holding ``checkpoint.pth`` gets that file suggested)."""
    p = Path(path).expanduser()
    if p.is_dir():
        hint = next((f"; did you mean {p / name}?" for name in ("checkpoint.pth", "checkpoint.pt")
                     if (p / name).is_file()), "")
        raise CheckpointError(f"{p} is a folder, not a checkpoint file{hint}")
    if not p.exists():
        raise FileNotFoundError(errno.ENOENT, "checkpoint file not found", str(p))
    return p


_TORCH_BOILERPLATE = ("weights only load failed", "please file an issue", "check the documentation",
                      "re-running", "(1)", "(2)", "do those steps", "in pytorch 2.6")


def _short_reason(err: BaseException, path: Path) -> str:
    """What is wrong with the file, in a few words, from torch's multi-paragraph message."""
    if path.stat().st_size == 0:
        return "the file is empty"
    for line in str(err).splitlines():
        line = line.replace("WeightsUnpickler error:", "").strip()
        if line and not line.lower().startswith(_TORCH_BOILERPLATE):
            first = line.split(". ")[0].rstrip(".")
            return f"{type(err).__name__}: {first[:160]}"
    return type(err).__name__


def _refused_global(err: BaseException) -> str | None:
    """The ``module.name`` that weights-only unpickling refused, if that is why ``err`` was raised.

    torch words it "Unsupported global: GLOBAL x.y was not an allowed global" (a class it does not
    know) or "Trying to load unsupported GLOBAL x.y whose module x is blocked" (os, subprocess...)."""
    if not isinstance(err, pickle.UnpicklingError):
        return None
    m = re.search(r"unsupported global:?\s+(?:GLOBAL\s+)?([\w.]+)", str(err), re.IGNORECASE)
    return m.group(1) if m else None


def read_checkpoint(path: str | os.PathLike, allow_pickle: bool = False,
                    map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint file (on CPU by default) without executing pickled code (unless ``allow_pickle``).

    The one checked reader of checkpoint files: model loading and a training's resume read through it,
    so a file that is not a checkpoint gets the same one-line message wherever it is met."""
    p = require_checkpoint_file(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except Exception as err:
            raise CheckpointError(f"{p} is not a readable safetensors file ({err})") from err
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as err:
        refused = _refused_global(err)
        if allow_pickle and isinstance(err, pickle.UnpicklingError):
            pass  # the full unpickler below may read what the weights-only one refused
        elif refused is None:
            raise CheckpointError(f"{p} is not a PyTorch checkpoint ({_short_reason(err, p)})") from err
        else:
            raise hinted(CheckpointError, f"{p} contains GLOBAL {refused} that weights_only loading refuses "
                         "(unpickling it would run code from the file)",
                         "if you trust the file, pass allow_pickle=True", needs="allow_pickle") from err
    warnings.warn(f"{p}: loading with weights_only=False (allow_pickle=True): this runs "
                  "pickled code from the file", stacklevel=2)
    try:
        return torch.load(p, map_location=map_location, weights_only=False)
    except Exception as err2:
        raise CheckpointError(f"{p} is not a PyTorch checkpoint ({_short_reason(err2, p)})") from err2


# ---------------------------------------------------------------------------------- naming
def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def detect_naming(sd: Mapping[str, Any]) -> str | None:
    """'official', 'mmpretrain' or 'timm' key naming of an (unprefixed) XCiT state dict."""
    keys = list(sd)
    if any(k.startswith(("xca_layers.", "ca_layers.")) for k in keys):
        return "mmpretrain"
    if any(k.startswith("pos_embeder.") for k in keys) or any(
            re.match(r"cls_attn_blocks\.\d+\.attn\.qkv\.", k) for k in keys):
        return "official"
    if any(k.startswith("blocks.") for k in keys) or "cls_token" in sd:
        return "timm"
    return None


def official_to_timm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """facebookresearch/xcit (and DINO) names -> timm names: ``pos_embeder`` -> ``pos_embed`` and
    the fused class-attention ``qkv`` split into ``q``, ``k``, ``v`` (timm only computes the CLS
    query). Same job as timm's ``checkpoint_filter_fn``, without needing a model instance."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        m = re.fullmatch(r"(cls_attn_blocks\.\d+\.attn)\.qkv\.(weight|bias)", k)
        if m:
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                out[f"{m.group(1)}.{name}.{m.group(2)}"] = part.clone()
        elif k.startswith("pos_embeder."):
            out["pos_embed." + k[len("pos_embeder."):]] = v
        else:
            out[k] = v
    return out


_MMPRETRAIN_RULES = [
    (r"^xca_layers\.", "blocks."),
    (r"^ca_layers\.", "cls_attn_blocks."),
    (r"\.ffn\.layers\.0\.0\.", ".mlp.fc1."),
    (r"\.ffn\.layers\.1\.", ".mlp.fc2."),
    (r"\.local_mp\.conv1\.conv\.", ".local_mp.conv1."),
    (r"\.local_mp\.conv1\.bn\.", ".local_mp.bn."),
    (r"\.local_mp\.conv2\.conv\.", ".local_mp.conv2."),
    (r"^pos_embed\.token_projection\.conv\.", "pos_embed.token_projection."),
    (r"^head\.fc\.", "head."),
]


def mmpretrain_to_timm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmpretrain names (backbone prefix already removed) -> timm names.

    mmpretrain's patch embedding is a list of ConvModules (conv+bn+act) indexed 0..3, timm's a
    Sequential where GELUs sit between (conv, bn) pairs: mmpretrain ``proj.i.conv`` / ``proj.i.bn``
    is timm ``proj.{2i}.0`` / ``proj.{2i}.1``.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        m = re.fullmatch(r"patch_embed\.proj\.(\d+)\.(conv|bn)\.(.+)", k)
        if m:
            k = f"patch_embed.proj.{2 * int(m.group(1))}.{0 if m.group(2) == 'conv' else 1}." \
                f"{m.group(3)}"
        else:
            for pattern, repl in _MMPRETRAIN_RULES:
                k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def strip_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper names: DDP's leading ``module.`` and torch.compile's ``_orig_mod.`` (which
    sits wherever the compiled module was, e.g. ``backbone._orig_mod.blocks.0...``)."""
    out = {}
    for k, v in sd.items():
        k = k.replace("._orig_mod.", ".")
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


# ---------------------------------------------------------------------------------- formats
def detect_format(obj: Any, source: str = "<checkpoint>") -> str:
    """Which of :data:`FORMATS` a loaded checkpoint object is."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict-like checkpoint, got "
                              f"{type(obj).__name__}")
    if obj.get("format") == "ssl_xcit":
        return "ssl_xcit"
    if isinstance(obj.get("teacher"), Mapping) or isinstance(obj.get("student"), Mapping):
        return "dino"
    if isinstance(obj.get("state_dict"), Mapping):
        return "mmpretrain"
    if isinstance(obj.get("model"), Mapping):
        return "official"
    if _is_state_dict(obj):
        naming = detect_naming(strip_prefixes(obj))
        if naming is None and any(k.startswith(("backbone.", "module.backbone.")) for k in obj):
            naming = detect_naming({k.split("backbone.", 1)[1]: v for k, v in obj.items()
                                    if "backbone." in k})
            if naming == "mmpretrain":
                return "mmpretrain"
            if naming is not None:
                return "dino_backbone"
        if naming == "mmpretrain":
            return "mmpretrain"
        if naming == "official":
            return "dino_backbone"
        if naming == "timm":
            return "timm"
    if isinstance(obj.get("probe"), Mapping) and "fingerprint" in obj:   # eval_linear's own checkpoint
        fingerprint = obj["fingerprint"] if isinstance(obj["fingerprint"], Mapping) else {}
        probed = f"; the backbone it probes: {fingerprint['checkpoint']}" if fingerprint.get("checkpoint") else ""
        raise CheckpointError(f"{source} is a linear-probe checkpoint (eval_linear's linear_checkpoint.pth: "
                              f"a linear layer on a frozen backbone's features), not a backbone{probed}")
    keys = list(obj)[:8]
    raise hinted(CheckpointError, f"{source}: unknown checkpoint format (top-level keys {keys}; the formats read "
                 f"here: {', '.join(FORMATS)})", "pass format= with one of them", needs="format")


@dataclass
class ExtractedWeights:
    """A state dict in timm naming plus what was learnt on the way."""

    state_dict: dict[str, torch.Tensor]
    format: str
    source: str
    naming: str | None = None
    arch: str | None = None  # from an ssl_xcit checkpoint's config
    dropped: list[str] = field(default_factory=list)  # keys removed on purpose (DINO head, ...)
    img_size: int | None = None  # the resolution an ssl_xcit fine-tuning run trained at


def _backbone_part(sd: Mapping[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """Keep ``backbone.*`` (prefix removed) of a DINO-style student/teacher; drop ``head.*`` etc."""
    sd = strip_prefixes(sd)
    if any(k.startswith("backbone.") for k in sd):
        kept = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        return kept, [k for k in sd if not k.startswith("backbone.")]
    kept = {k: v for k, v in sd.items() if not k.startswith("head.")}
    return kept, [k for k in sd if k.startswith("head.")]


def _mmpretrain_part(obj: Mapping) -> tuple[dict, list[str]]:
    """An mmpretrain file's backbone and classifier (``head.fc.``), and the names of what else it holds."""
    sd = strip_prefixes(obj.get("state_dict", obj))
    if not any(k.startswith("backbone.") for k in sd):
        return sd, []
    keep = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    keep.update({k: v for k, v in sd.items() if k.startswith("head.fc.")})
    return keep, [k for k in sd if not k.startswith(("backbone.", "head.fc."))]


def extract_state_dict(obj: Any, format: str = "auto", checkpoint_key: str = "teacher",
                       source: str = "<checkpoint>") -> ExtractedWeights:
    """Unwrap a loaded checkpoint object and rename its keys to timm's naming."""
    fmt = detect_format(obj, source) if format == "auto" else format
    if fmt not in FORMATS:
        raise CheckpointError(f"{source}: unknown format={format!r}; valid: 'auto', "
                              f"{', '.join(FORMATS)}")
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict-like checkpoint, got "
                              f"{type(obj).__name__}")
    arch = None
    dropped: list[str] = []
    img_size = None
    if fmt == "ssl_xcit" and obj.get("kind") == "finetune":
        # a fine-tuned classifier: the model itself (its EMA with checkpoint_key='ema'); the DINO
        # names teacher/student, every tool's default, mean the model
        key = "ema" if checkpoint_key == "ema" else "model"
        if not isinstance(obj.get(key), Mapping):
            raise CheckpointError(f"{source}: this fine-tuning checkpoint has no {key!r} weights"
                                  + (" (it ran without model_ema)" if key == "ema" else ""))
        sd = strip_prefixes(obj[key])
        cfg = obj.get("config") if isinstance(obj.get("config"), Mapping) else {}
        arch = cfg.get("model", {}).get("arch")
        img_size = cfg.get("data", {}).get("input_size")
    elif fmt in ("dino", "ssl_xcit"):
        if checkpoint_key not in obj or not isinstance(obj[checkpoint_key], Mapping):
            avail = [k for k, v in obj.items() if isinstance(v, Mapping)]
            raise CheckpointError(f"{source}: checkpoint_key={checkpoint_key!r} not found; "
                                  f"state dicts in this file: {avail}")
        sd, dropped = _backbone_part(obj[checkpoint_key])
        if fmt == "ssl_xcit":
            cfg = obj.get("config")
            model_cfg = cfg.get("model") if isinstance(cfg, Mapping) else None
            arch = model_cfg.get("arch") if isinstance(model_cfg, Mapping) else None
    elif fmt == "mmpretrain":
        sd, dropped = _mmpretrain_part(obj)
    elif fmt == "official":
        sd = strip_prefixes(obj.get("model", obj))
    else:  # dino_backbone, timm
        sd = strip_prefixes(obj)
        if fmt == "dino_backbone" and any(k.startswith("backbone.") for k in sd):
            sd, dropped = _backbone_part(sd)
    if not _is_state_dict(sd):
        raise CheckpointError(f"{source}: format {fmt!r} expected a state dict of tensors but "
                              f"found other values (keys {list(sd)[:8]})")
    naming = detect_naming(sd)
    if naming is None:
        raise CheckpointError(f"{source}: no XCiT weights found (format {fmt!r}, keys "
                              f"{list(sd)[:8]})")
    if naming == "official":
        sd = official_to_timm(sd)
    elif naming == "mmpretrain":
        sd = mmpretrain_to_timm(sd)
    if dropped:
        log.info("%s: dropped %d non-backbone keys (%s...)", source, len(dropped), dropped[:3])
    return ExtractedWeights(dict(sd), fmt, source, naming, arch, dropped, img_size)


def load_state_source(checkpoint: str | os.PathLike | Mapping, format: str = "auto",
                      checkpoint_key: str = "teacher", allow_pickle: bool = False
                      ) -> ExtractedWeights:
    """A file path or an already-loaded checkpoint object -> :class:`ExtractedWeights`."""
    if isinstance(checkpoint, Mapping):
        return extract_state_dict(checkpoint, format, checkpoint_key, "<in-memory checkpoint>")
    obj = read_checkpoint(checkpoint, allow_pickle=allow_pickle)
    return extract_state_dict(obj, format, checkpoint_key, str(checkpoint))


# ---------------------------------------------------------------------------------- arch
def infer_arch(sd: Mapping[str, torch.Tensor], source: str = "<checkpoint>") -> str:
    """The zoo architecture whose shapes a timm-named state dict has (embed dim, depth, patch
    size, heads)."""
    try:
        dim = int(sd["cls_token"].shape[-1])
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
        heads = int(sd["blocks.0.attn.temperature"].shape[0])
    except (KeyError, ValueError) as err:
        raise hinted(CheckpointError, f"{source}: cannot infer the XCiT architecture (no cls_token / "
                     "blocks.N / blocks.0.attn.temperature keys)", "pass arch=", needs="arch") from err
    patch = 16 if any(k.startswith("patch_embed.proj.6.") for k in sd) else 8
    for spec in ARCHS.values():
        if (spec.embed_dim, spec.depth, spec.patch_size, spec.num_heads) == (dim, depth, patch,
                                                                              heads):
            return spec.name
    raise hinted(CheckpointError, f"{source}: no zoo architecture has embed_dim={dim}, depth={depth}, "
                 f"patch_size={patch}, num_heads={heads}", "pass arch= and overrides", needs="arch")


# ---------------------------------------------------------------------------------- loading
@dataclass
class LoadReport:
    """What :func:`load_into` did."""

    source: str
    format: str
    head: str  # 'loaded', 'dropped' (size mismatch), 'not in model', 'not in checkpoint'
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def _fmt_keys(keys: list[str], n: int = 12) -> str:
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_into(model: torch.nn.Module, weights: ExtractedWeights, strict: bool = True
              ) -> LoadReport:
    """Copy weights into ``model``. Strict: any missing, unexpected or mis-shaped key is an error
    listing them. A classifier head is the one tolerated difference: a head of another size is
    dropped with a warning, a head the checkpoint lacks stays at its initialisation (warning), a
    checkpoint head is ignored by a backbone (num_classes=0)."""
    sd = dict(weights.state_dict)
    src = weights.source
    own = model.state_dict()
    model_has_head = "head.weight" in own
    ck_has_head = "head.weight" in sd
    if ck_has_head and not model_has_head:
        head = "not in model"
        for k in HEAD_KEYS:
            sd.pop(k, None)
    elif (ck_has_head and sd["head.weight"].shape != own["head.weight"].shape
          and sd["head.weight"].shape[1:] == own["head.weight"].shape[1:]):
        head = "dropped"  # same feature size, other number of classes
        warnings.warn(f"{src}: classifier head has {sd['head.weight'].shape[0]} classes, the model "
                      f"{own['head.weight'].shape[0]}; checkpoint head dropped, model head left at "
                      "its random initialisation", stacklevel=2)
        for k in HEAD_KEYS:
            sd.pop(k, None)
    elif model_has_head and not ck_has_head:
        head = "not in checkpoint"
        warnings.warn(f"{src}: no classifier head in the checkpoint; the model's "
                      f"{own['head.weight'].shape[0]}-class head keeps its random initialisation",
                      stacklevel=2)
    else:
        head = "loaded" if ck_has_head else "not in model"
    missing = [k for k in own if k not in sd and k not in HEAD_KEYS
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sd if k in own and sd[k].shape != own[k].shape]
    arch = getattr(model, "arch", type(model).__name__)
    if mismatched:
        try:
            hint = f"; the checkpoint looks like {infer_arch(sd, src)}"
        except CheckpointError:
            hint = ""
        raise CheckpointError(f"{src}: does not fit {arch} (wrong arch?): {len(mismatched)} "
                              f"shape mismatches: {_fmt_keys(mismatched, 6)}{hint}")
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{src} (format {weights.format}): strict loading into {arch} failed: "
            f"missing keys [{_fmt_keys(missing)}]; unexpected keys [{_fmt_keys(unexpected)}]")
    if missing or unexpected:
        warnings.warn(f"{src}: non-strict load into {arch}: {len(missing)} missing "
                      f"[{_fmt_keys(missing, 5)}], {len(unexpected)} unexpected "
                      f"[{_fmt_keys(unexpected, 5)}]", stacklevel=2)
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return LoadReport(src, weights.format, head, missing, unexpected)


def load_weights(model: torch.nn.Module, checkpoint: str | os.PathLike | Mapping,
                 format: str = "auto", checkpoint_key: str = "teacher", strict: bool = True,
                 allow_pickle: bool = False) -> LoadReport:
    """Read ``checkpoint`` (file or loaded object) in any supported format into ``model``."""
    weights = load_state_source(checkpoint, format, checkpoint_key, allow_pickle)
    return load_into(model, weights, strict=strict)

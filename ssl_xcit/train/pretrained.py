"""``pretrained_weights=FILE``: start a new DINO run from published or earlier weights.

Users who patch the official code to continue DINO from its published checkpoints report that the
features get worse, not better (facebookresearch/dino#207, #284): the student and teacher get the
backbone, but a fresh random head pushes its gradients into it, the centre restarts at zero and the
lr warms up to a from-scratch value. So everything the file has that fits is carried over:

* any file :func:`ssl_xcit.models.load_backbone` reads gives both backbones (official XCiT, DINO
  backbone-only, timm / ``.safetensors``, mmpretrain: one network, into the student and the teacher);
* a DINO training checkpoint (official, ``student``/``teacher`` with ``module.`` prefixes and a
  weight-normalised head) or one of ours also gives the student's and the teacher's own networks
  (``pretrained_checkpoint_key=auto``; ``teacher`` or ``student`` puts that one into both), the DINO
  head when its shape fits the run's head, and the loss centre;
* what does not fit (another head, no head, no centre) starts fresh, said on the console with the reason.

``recipe: auto`` then chooses how to continue (:func:`ssl_xcit.train.recipe.continuing`), and the
file's sha256 and what was taken from it go into ``config.yaml`` and every checkpoint.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ssl_xcit.models.checkpoints import (strip_prefixes, detect_format, extract_state_dict, infer_arch,
                                         load_into, read_checkpoint)
from ssl_xcit.models.zoo import resolve_arch
from ssl_xcit.train.config import ConfigError

HEAD_KEYS = ("model.out_dim", "model.use_bn_in_head", "model.head_hidden_dim", "model.head_bottleneck_dim",
             "model.head_nlayers", "model.norm_last_layer")


@dataclass
class PretrainedFile:
    """What a pretrained file holds, in this package's naming."""
    path: str
    sha256: str
    format: str
    arch: str
    backbones: dict[str, dict[str, torch.Tensor]]   # 'student' / 'teacher' -> timm-named backbone
    heads: dict[str, dict[str, torch.Tensor]]       # 'student' / 'teacher' -> DINO head state dict ({} if none)
    head_spec: dict[str, Any] | None                # the head's shape as config values (None: no head)
    center: torch.Tensor | None                     # the DINO loss centre (1, out_dim), if the file has one

    def facts(self) -> dict[str, Any]:
        """What the recipe and the records need (no tensors): also what a resumed run reads back."""
        return {"path": self.path, "sha256": self.sha256, "format": self.format, "arch": self.arch,
                "head": self.head_spec, "center": self.center is not None}


def read_pretrained(path: str, checkpoint_key: str = "auto") -> PretrainedFile:
    """Read ``path`` once: its backbones, DINO heads and centre, and its sha256."""
    from ssl_xcit.atomic import file_sha256
    obj = read_checkpoint(path)
    fmt = detect_format(obj, path)
    backbones, heads, center, spec = {}, {}, None, None
    if fmt in ("dino", "ssl_xcit") and obj.get("kind") != "finetune":   # a fine-tuned classifier: one network
        for part in ("student", "teacher"):
            source = part if checkpoint_key == "auto" else checkpoint_key
            backbones[part] = extract_state_dict(obj, fmt, source, path).state_dict
            heads[part] = _head_part(obj.get(source, {}))
        spec = _head_spec(heads["teacher"], obj) if heads["teacher"] else None
        center = _center(obj)
    else:
        weights = extract_state_dict(obj, fmt, "teacher", path).state_dict
        backbones = {"student": weights, "teacher": weights}
    file_arch = _file_arch(obj, backbones["teacher"], path)
    return PretrainedFile(str(path), file_sha256(path), fmt, file_arch, backbones, heads, spec, center)


def _file_arch(obj: Any, backbone: dict, path: str) -> str:
    cfg = obj.get("config") if isinstance(obj, Mapping) else None
    arch = cfg.get("model", {}).get("arch") if isinstance(cfg, Mapping) else None
    return resolve_arch(arch) if arch else infer_arch(backbone, path)


def _head_part(network: Mapping) -> dict[str, torch.Tensor]:
    """The ``head.*`` entries of a DINO network's state dict (prefixes such as ``module.`` removed)."""
    if not isinstance(network, Mapping):
        return {}
    sd = strip_prefixes(network)
    return {k[len("head."):]: v for k, v in sd.items() if k.startswith("head.") and isinstance(v, torch.Tensor)}


def _head_spec(head: dict[str, torch.Tensor], obj: Mapping) -> dict[str, Any] | None:
    """The DINO head's shape as config values, read from its tensors (DINO's and ours name them the same)."""
    linears = sorted((k for k, v in head.items() if k.startswith("mlp") and k.endswith("weight") and v.ndim == 2),
                     key=lambda k: [int(n) for n in re.findall(r"\d+", k)])
    last = head.get("last_layer.weight_v", head.get("last_layer.parametrizations.weight.original1"))
    if not linears or last is None:
        return None
    g = head.get("last_layer.weight_g", head.get("last_layer.parametrizations.weight.original0"))
    norm_last = _saved_norm_last_layer(obj)
    if norm_last is None:   # DINO fixes g to 1 when it normalises the prototypes
        norm_last = bool(g is not None and torch.all(g == 1))
    return {"model.out_dim": int(last.shape[0]),
            "model.use_bn_in_head": any(k.endswith("running_mean") for k in head),
            "model.head_hidden_dim": int(head[linears[0]].shape[0]) if len(linears) > 1 else 2048,
            "model.head_bottleneck_dim": int(head[linears[-1]].shape[0]),
            "model.head_nlayers": len(linears),
            "model.norm_last_layer": norm_last}


def _saved_norm_last_layer(obj: Mapping) -> bool | None:
    cfg = obj.get("config")
    if isinstance(cfg, Mapping) and "norm_last_layer" in cfg.get("model", {}):
        return bool(cfg["model"]["norm_last_layer"])
    args = obj.get("args")
    value = getattr(args, "norm_last_layer", None) if args is not None else None
    return None if value is None else bool(value)


def _center(obj: Mapping) -> torch.Tensor | None:
    loss = obj.get("dino_loss")
    center = loss.get("center") if isinstance(loss, Mapping) else None
    return center if isinstance(center, torch.Tensor) and center.ndim == 2 else None


def check_arch(facts: dict[str, Any], arch: str) -> None:
    """One line when the run's arch is not the file's."""
    if resolve_arch(arch) != facts["arch"]:
        raise ConfigError(f"pretrained_weights {facts['path']} holds an {facts['arch']} backbone, this run's arch "
                          f"is {arch}: set arch={facts['arch']} (or leave arch unset to take the file's)")


def load_into_dino(pretrained: PretrainedFile, student: torch.nn.Module, teacher: torch.nn.Module,
                   loss: torch.nn.Module) -> list[str]:
    """Copy what fits into the student, the teacher and the loss; returns what was done, and why
    not where something starts fresh (said on the console and recorded)."""
    notes = []
    for part, model in (("student", student), ("teacher", teacher)):
        load_into(model.backbone, _named(pretrained, part), strict=True)
    notes.append(f"backbones from {pretrained.format} file {pretrained.path}"
                 + (" (student from its student, teacher from its teacher)"
                    if pretrained.heads and pretrained.backbones["student"] is not pretrained.backbones["teacher"]
                    else ""))
    notes.append(_load_heads(pretrained, student, teacher))
    center = pretrained.center
    if center is not None and center.shape == loss.center.shape:
        with torch.no_grad():
            loss.center.copy_(center)
        notes.append("loss centre from the file")
    else:
        why = "the file has none" if center is None else f"its shape {tuple(center.shape)} is not this head's"
        notes.append(f"loss centre starts fresh ({why})")
    return notes


def _named(pretrained: PretrainedFile, part: str):
    from ssl_xcit.models.checkpoints import ExtractedWeights
    return ExtractedWeights(pretrained.backbones[part], pretrained.format, pretrained.path)


def _load_heads(pretrained: PretrainedFile, student: torch.nn.Module, teacher: torch.nn.Module) -> str:
    if not pretrained.heads or not pretrained.heads.get("teacher"):
        return "fresh DINO head (the file has no DINO head: it holds a backbone only)"
    fresh = copy.deepcopy(student.head.state_dict())   # the teacher's too: it starts as the student's copy
    try:
        for part, model in (("student", student), ("teacher", teacher)):
            model.head.load_state_dict(dict(pretrained.heads[part]), strict=True)
    except RuntimeError as err:
        student.head.load_state_dict(fresh)
        teacher.head.load_state_dict(fresh)
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        return f"fresh DINO head (the file's head does not fit this run's: {(lines[1:] or lines)[0][:160]})"
    return "DINO heads from the file"

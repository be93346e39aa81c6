"""Building models by name: random init, published weights from a local cache, or any checkpoint.

Why a local cache and no implicit download: training and evaluation nodes often have no network;
a missing file must fail at once with the file name and folder, and downloading is an explicit
choice (``download=True``).
"""
from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from timm.models.xcit import Xcit

from ssl_xcit.errors import UserError, hinted

from .checkpoints import infer_arch, load_into, load_state_source
from .xcit import XCiT
from .zoo import ZOO, resolve

log = logging.getLogger(__name__)


class PretrainedNotFound(UserError, FileNotFoundError):
    """The published weights of a model are not in the local cache (and no download was asked for)."""

# Constructor arguments an override may set (timm's Xcit arguments, less the ones we own).
_OVERRIDABLE = sorted(set(inspect.signature(Xcit.__init__).parameters) - {"self", "num_classes"})


def cache_dir() -> Path:
    """Folder of published checkpoints: ``$SSL_XCIT_HOME``, else ``torch.hub.get_dir()/checkpoints``."""
    home = os.environ.get("SSL_XCIT_HOME")
    if home:
        return Path(home).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints"


def pretrained_file(name: str, download: bool = False) -> Path:
    """Local path of the published weights for ``name``; downloads only when ``download=True``."""
    resolved = resolve(name)
    entry = resolved.entry
    if entry is None:
        raise ValueError(f"no published weights for {name!r} ({resolved.arch.name} at "
                         f"{resolved.img_size} px); zoo names with weights: "
                         f"{', '.join(e.name for e in ZOO.values() if e.arch == resolved.arch.name)}")
    folder = cache_dir()
    path = folder / entry.filename
    if path.is_file():
        return path
    if not download:
        raise hinted(PretrainedNotFound, f"pretrained weights for {name!r} not found: file {entry.filename} "
                     f"is not in folder {folder} (set $SSL_XCIT_HOME to use another folder, or copy the file "
                     f"from {entry.url})", "or pass download=True", needs="download")
    _download_once_per_node(entry.url, path, entry.sha256_prefix)
    return path


def _download_once_per_node(url: str, path: Path, hash_prefix: str | None) -> None:
    """Download ``url`` to ``path``; under a process group only local rank 0 downloads.

    Why: with 8 GPUs a node would otherwise fetch the same file 8 times into one folder. The
    other ranks wait at a barrier and then use the file; if the download failed they raise too
    (after the barrier, so nobody hangs) with the file name.
    """
    import torch.distributed as dist
    grouped = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    downloader = not grouped or int(os.environ.get("LOCAL_RANK", "0")) == 0
    error: Exception | None = None
    if downloader:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            log.info("downloading %s to %s", url, path)
            # torch.hub writes to a temporary file and renames it, and checks mmpretrain's sha256 prefix.
            torch.hub.download_url_to_file(url, str(path), hash_prefix=hash_prefix)
        except Exception as err:  # noqa: BLE001 - re-raised below, after the barrier
            error = err
    if grouped:
        dist.barrier()
    if error is not None:
        raise error
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the download by local rank 0 of this node failed (see its log); "
                                f"copy the file from {url} into {path.parent}")


def build_model(name: str, num_classes: int | None = None, **overrides: Any) -> XCiT:
    """A randomly initialised model for any accepted name (see :func:`ssl_xcit.list_models`).

    ``num_classes=None``: the head the name's weights come with (1000 ImageNet classes; none for
    DINO's backbones, e.g. ``dino_xcit_small_12_p16``)."""
    resolved = resolve(name)
    if num_classes is None:
        num_classes = resolved.num_classes
    unknown = sorted(set(overrides) - set(_OVERRIDABLE))
    if unknown:
        raise TypeError(f"get_model({name!r}): unknown override(s) {unknown}; valid: "
                        f"{', '.join(_OVERRIDABLE)}")
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
    kwargs: dict[str, Any] = dict(resolved.arch.model_kwargs(), img_size=resolved.img_size)
    kwargs.update(overrides)
    return XCiT(arch=resolved.arch.name, zoo_name=resolved.name, num_classes=num_classes, **kwargs)


def get_model(name: str, pretrained: bool | str | os.PathLike = False, num_classes: int | None = None,
              *, download: bool = False, checkpoint_key: str = "teacher", format: str = "auto",
              strict: bool = True, allow_pickle: bool = False, features_only: bool = False,
              out_indices: Any = None, **overrides: Any) -> XCiT:
    """Build an XCiT by name, optionally with weights.

    ``pretrained``: False (random init), True (the published weights of ``name``, from
    :func:`cache_dir`; an arch name means its non-distilled 224-px ImageNet-1k weights), or a
    checkpoint path in any format of :mod:`ssl_xcit.models.checkpoints`. ``num_classes=0`` gives a
    backbone returning the final CLS feature; ``None`` the head of the name's published weights
    (1000 classes, or 0 for DINO's backbones). ``overrides`` go to the model constructor
    (``drop_path_rate``, ``img_size``, ...).

    ``features_only=True`` (timm's convention) returns a :class:`ssl_xcit.models.dense.DenseFeatures`
    instead: one (B, C, H/p, W/p) map per entry of ``out_indices`` (XCA block indices, or ``"final"``
    for the final normed patch tokens; default the XCiT paper's (3, 5, 7, 11) at depth 12).
    """
    if out_indices is not None and not features_only:
        raise ValueError("out_indices is only used with features_only=True")
    model = build_model(name, num_classes=num_classes, **overrides)
    if pretrained is not False and pretrained is not None:
        _load_pretrained(model, name, pretrained, download, format, checkpoint_key, strict, allow_pickle)
    if features_only:
        from .dense import DenseFeatures
        return DenseFeatures(model, out_indices)
    return model


def _load_pretrained(model: XCiT, name: str, pretrained: Any, download: bool, format: str, checkpoint_key: str,
                     strict: bool, allow_pickle: bool) -> None:
    if pretrained is True:
        path = pretrained_file(name, download=download)
    elif isinstance(pretrained, (str, os.PathLike)):
        path = Path(pretrained)
    else:
        raise TypeError(f"pretrained must be False, True or a file path, got {pretrained!r}")
    load_into(model, load_state_source(path, format, checkpoint_key, allow_pickle), strict=strict)


def load_backbone(checkpoint: str | os.PathLike | Mapping, arch: str | None = None,
                  checkpoint_key: str = "teacher", format: str = "auto", num_classes: int = 0,
                  *, strict: bool = True, allow_pickle: bool = False, **overrides: Any) -> XCiT:
    """A model for evaluation tools, in eval mode, from any checkpoint.

    The architecture is ``arch`` when given, else an ssl_xcit checkpoint's
    ``config['model']['arch']``, else inferred from the weights' shapes. ``checkpoint`` may also be
    a model name with no file of that name: a randomly initialised model (the "random backbone"
    baseline).
    """
    if isinstance(checkpoint, (str, os.PathLike)) and not Path(checkpoint).exists():
        text = str(checkpoint)
        try:
            resolve(text)
        except ValueError as err:
            looks_like_path = os.sep in text or text.endswith((".pth", ".pt", ".safetensors",
                                                               ".ckpt", ".bin"))
            if looks_like_path:
                raise FileNotFoundError(f"checkpoint file not found: {text}") from None
            raise ValueError(f"checkpoint {text!r} is neither an existing file nor a model name: "
                             f"{err}") from None
        log.info("%s is a model name, not a file: random initialisation", text)
        return build_model(arch or text, num_classes=num_classes, **overrides).eval()
    weights = load_state_source(checkpoint, format, checkpoint_key, allow_pickle)
    name = arch or weights.arch or infer_arch(weights.state_dict, weights.source)
    if arch and weights.arch and resolve(arch).arch != resolve(weights.arch).arch:
        log.warning("%s: arch=%s given, but its config says %s; using %s", weights.source, arch,
                    weights.arch, arch)
    model = build_model(name, num_classes=num_classes, **overrides)
    load_into(model, weights, strict=strict)
    return model.eval()


__all__ = ["cache_dir", "pretrained_file", "build_model", "get_model", "load_backbone"]

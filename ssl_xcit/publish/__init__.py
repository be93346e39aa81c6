"""Publish a backbone where people load models: a folder timm and the Hugging Face Hub read.

``publish(CHECKPOINT, OUT_DIR)`` writes the layout timm loads from the Hub or a local folder
(``timm.create_model("hf-hub:USER/NAME", pretrained=True)``, ``timm.create_model("local-dir:OUT_DIR",
pretrained=True)``; without ``pretrained=True`` timm builds random weights):

* ``model.safetensors``: the backbone (no head) in timm's key names, checked by a strict load into
  timm's own ``Xcit`` and by comparing its features with ours (the file must give the features
  ``ssl_xcit.load_backbone`` gives);
* ``config.json``: timm's ``pretrained_cfg`` (written by timm's ``save_config_for_hf``): architecture,
  ``num_features``, ``input_size``, mean/std, ``crop_pct``, interpolation, licence;
* ``README.md``: the model card, from the run folder (:mod:`ssl_xcit.publish.card`).

:func:`push_to_hub` uploads the folder with ``huggingface_hub``; nothing here touches the network
otherwise. The command line is ``python -m ssl_xcit.publish`` (``ssl-xcit-publish``). Imports are lazy:
``--help`` answers before torch loads.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssl_xcit.errors import UserError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
OWN_FILES = (WEIGHTS, CONFIG, CARD)
FEATURE_TOLERANCE = 1e-5   # max abs difference between timm's features and ours (fp32)


class PublishError(UserError, ValueError):
    """A checkpoint or a folder that cannot be published as asked; the message says why."""


@dataclass
class Published:
    folder: Path
    timm_name: str             # timm's architecture name, e.g. xcit_small_12_p16_224
    max_abs_diff: float        # timm's features against ours on a random batch
    uploaded: Any = None       # what the upload returned, with a repo id


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """The folder to write: new, empty, or holding only an earlier publish's files. Why so strict:
    the whole folder is what an upload sends, and a run folder holds checkpoints and logs."""
    folder = Path(out_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise PublishError(f"{folder} is a file; give a folder (created if missing)")
    others = sorted(p.name for p in folder.iterdir() if p.name not in OWN_FILES) if folder.is_dir() else []
    if others:
        raise PublishError(f"{folder} holds other files ({', '.join(others[:5])}); give a new or empty folder: "
                           "the whole folder is what an upload sends")
    return folder


def timm_name(arch: str, img_size: int = 224) -> str:
    """timm's registered name of an architecture (timm registers XCiTs at 224 and 384 px; the
    weights do not depend on it)."""
    return f"{arch}_384" if img_size == 384 else f"{arch}_224"


def _data_config(facts_config: dict, img_size: int | None) -> dict:
    """What the weights were evaluated with: the run's k-NN resolution and DINO's resize ratio."""
    from ssl_xcit.evaluate.datasets import IMAGENET_MEAN, IMAGENET_STD, resize_for
    ev, data = facts_config.get("eval", {}), facts_config.get("data", {})
    crop = img_size or ev.get("eval_crop_size") or data.get("global_crops_size") or data.get("input_size") or 224
    resize = resize_for(crop, ev.get("eval_resize") or None)
    return {"input_size": (3, crop, crop), "crop_pct": round(crop / resize, 4), "interpolation": "bicubic",
            "mean": tuple(IMAGENET_MEAN), "std": tuple(IMAGENET_STD)}


def _timm_model(name: str, state_dict: dict, img_size: int, num_classes: int = 0):
    """timm's own XCiT holding the weights, loaded strictly: a key timm would not read fails here."""
    import timm
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise PublishError(f"the weights do not load strictly into timm's {name}: "
                           f"{str(err).splitlines()[0]}") from err
    return model.eval()


def _compare(ours, theirs, img_size: int) -> float:
    """Max abs difference of the two models' features on a fixed random batch (fp32, CPU)."""
    import torch
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, img_size, img_size, generator=gen)
    with torch.no_grad():
        diff = (ours.float().cpu()(x) - theirs.float().cpu()(x)).abs().max().item()
    if not diff <= FEATURE_TOLERANCE:
        raise PublishError(f"timm's {type(theirs).__name__} gives other features than ssl_xcit's backbone "
                           f"(max abs difference {diff:.3g} > {FEATURE_TOLERANCE}); nothing was published")
    return diff


def _write_config(model, path: Path, data_config: dict, license: str, notes: list[str],
                  label_names: list[str] | None = None) -> None:
    """timm's ``save_config_for_hf``, then this run's licence and notes in place of the ones timm's
    registry carries for its own (supervised) weights; a kept classifier head's class names as
    timm's ``label_names``."""
    from timm.models._hub import save_config_for_hf

    from ssl_xcit.atomic import atomic_write_text
    with tempfile.TemporaryDirectory() as tmp:
        save_config_for_hf(model, str(Path(tmp) / CONFIG), model_config={"label_names": label_names or None},
                           data_config={k: v for k, v in data_config.items() if k != "input_size"})
        cfg = json.loads((Path(tmp) / CONFIG).read_text())
    pretrained = cfg["pretrained_cfg"]
    for key in ("tag", "hf_hub_id", "url", "file", "source", "paper_ids", "paper_name", "origin_url"):
        pretrained.pop(key, None)
    pretrained.update(license=license, notes=notes)
    atomic_write_text(path, json.dumps(cfg, indent=2) + "\n")


def _write_weights(model, path: Path) -> None:
    """The weights, readable by all like the folder's other files (an atomic write's temporary file
    is created 0600; an upload or a shared model folder wants 0644, as config.json and README.md)."""
    from safetensors.torch import save_file

    from ssl_xcit.atomic import atomic_write
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _classifier_head(raw: Any, weights: Any, keep_head: bool, path: Path) -> tuple[int, list[str] | None]:
    """(num_classes, class names) of what is published: a backbone (0, None) unless ``keep_head``,
    which needs a classifier head in the file (a fine-tuned checkpoint's, or a timm classifier's)."""
    if not keep_head:
        return 0, None
    head = weights.state_dict.get("head.weight")
    if head is None or head.ndim != 2:
        from ssl_xcit.errors import hinted
        raise hinted(PublishError, f"{path} holds no classifier head (a DINO checkpoint's head is a projection for "
                     "its loss, not a classifier)", "publish it without keep_head=True", needs="keep_head")
    classes = raw.get("classes") if isinstance(raw, dict) else None
    names = [str(c) for c in classes] if isinstance(classes, (list, tuple)) and len(classes) == head.shape[0] else None
    return int(head.shape[0]), names


def publish(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, checkpoint_key: str = "teacher",
            license: str = "unknown", repo_id: str | None = None, img_size: int | None = None,
            allow_pickle: bool = False, keep_head: bool = False) -> Published:
    """Write ``model.safetensors``, ``config.json`` and ``README.md`` of the backbone in ``checkpoint``
    (the teacher of a DINO training checkpoint unless ``checkpoint_key='student'``; any format
    :func:`ssl_xcit.load_backbone` reads) into ``out_dir``. ``img_size``: the resolution recorded in the
    config (default: the run's k-NN resolution, else 224). ``repo_id`` only shapes the card's snippet.
    ``keep_head``: publish the classifier (head and class names) of a fine-tuned checkpoint."""
    from ssl_xcit.atomic import atomic_write_text
    from ssl_xcit.models.checkpoints import (extract_state_dict, infer_arch, load_into, read_checkpoint,
                                             require_checkpoint_file)
    from ssl_xcit.models.factory import build_model
    from ssl_xcit.publish.card import gather, model_card

    folder = check_out_dir(out_dir)
    path = require_checkpoint_file(checkpoint)
    raw = read_checkpoint(path, allow_pickle=allow_pickle)
    weights = extract_state_dict(raw, checkpoint_key=checkpoint_key, source=str(path))
    arch = weights.arch or infer_arch(weights.state_dict, str(path))
    num_classes, label_names = _classifier_head(raw, weights, keep_head, path)
    ours = build_model(arch, num_classes=num_classes).eval()
    load_into(ours, weights, strict=True)
    facts = gather(path, raw, weights, checkpoint_key)
    facts.arch, facts.head_kept = ours.arch, bool(num_classes)
    data_config = _data_config(facts.config, img_size)
    size = data_config["input_size"][-1]
    name = timm_name(ours.arch, size)
    theirs = _timm_model(name, ours.state_dict(), size, num_classes)
    diff = _compare(ours, theirs, size)
    folder.mkdir(parents=True, exist_ok=True)
    _write_weights(theirs, folder / WEIGHTS)
    notes = [(f"supervised fine-tuning with ssl_xcit: the {'classifier' if num_classes else 'backbone'} of "
              f"{path.name}") if facts.kind == "finetune" else
             f"DINO self-supervised pretraining with ssl_xcit: the {checkpoint_key} backbone of {path.name}"]
    _write_config(theirs, folder / CONFIG, data_config, license, notes, label_names)
    atomic_write_text(folder / CARD, model_card(facts, name, license, repo_id, data_config, raw))
    return Published(folder, name, diff)


def hub_api() -> type:
    """huggingface_hub's ``HfApi``, imported only when an upload is asked for (an optional dependency:
    ``pip install 'ssl_xcit[hub]'``); its absence is one clear error, raised before any work."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise PublishError("uploading to the Hugging Face Hub needs huggingface_hub: pip install huggingface_hub "
                           "(or pip install 'ssl_xcit[hub]')") from None
    return HfApi


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str = "Upload DINO XCiT backbone (ssl_xcit)") -> Any:
    """Create the Hub repository if needed and upload ``folder`` (what :func:`publish` wrote) with
    ``huggingface_hub``: the only network access of this module, and only when called."""
    api = hub_api()(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=getattr(repo, "repo_id", repo_id), folder_path=str(folder),
                             commit_message=commit_message)


__all__ = ["Published", "PublishError", "check_out_dir", "hub_api", "publish", "push_to_hub", "timm_name"]

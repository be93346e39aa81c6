"""Training checkpoints: what a run needs to continue bit for bit, written atomically.

The file is a plain dict of tensors, numbers, strings and lists so that it loads with
``torch.load(weights_only=True)``; ``format: 'ssl_xcit'`` lets ``get_model``/``load_backbone``
recognise it, and ``config`` records the arch so evaluation needs no flags.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl_xcit.atomic import atomic_torch_save
# CheckpointError is defined once, with the checked reader; imported from here by the training code
from ssl_xcit.models.checkpoints import CheckpointError, read_checkpoint

CHECKPOINT_NAME = "checkpoint.pth"
FORMAT = "ssl_xcit"
VERSION = 1


def capture_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(_listify(random.getstate())),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tupleify(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _listify(obj: Any) -> Any:
    return [_listify(o) for o in obj] if isinstance(obj, (tuple, list)) else obj


def _tupleify(obj: Any) -> Any:
    return tuple(_tupleify(o) for o in obj) if isinstance(obj, list) else obj


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Atomically write ``state`` (temp file + rename): a crash never leaves a truncated file."""
    state = {"format": FORMAT, "version": VERSION, **state}
    return atomic_torch_save(state, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training checkpoint through the project's checked reader
    (:func:`ssl_xcit.models.checkpoints.read_checkpoint`: ``weights_only=True``, one-line errors that
    name the file and the problem -- a folder, random bytes, a truncated file, pickled code), then
    check that it is a resumable ssl_xcit training checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    state = read_checkpoint(path, map_location=map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an ssl_xcit training checkpoint (no format: {FORMAT!r} key)")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer ssl_xcit (format version {state['version']})")
    missing = [k for k in ("epoch", "global_step", "rng") if k not in state]
    if missing:   # what a run's own parts need (models, optimizer) each Trainable checks (check_fits)
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: not a resumable training checkpoint")
    return state


def require_parts(state: dict[str, Any], path: Path, parts: tuple[str, ...], what: str) -> None:
    """One line when the checkpoint lacks a part this kind of run (``what``) resumes from."""
    missing = [k for k in parts if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: not a resumable {what} checkpoint")


def state_dict_mismatch(saved: dict, here: dict) -> str | None:
    """What keeps ``saved`` from loading into a module whose state dict is ``here`` (None: it fits)."""
    missing = [k for k in here if k not in saved]
    unexpected = [k for k in saved if k not in here]
    reshaped = [k for k in here if k in saved and tuple(saved[k].shape) != tuple(here[k].shape)]
    if not (missing or unexpected or reshaped):
        return None
    parts = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in
             ((missing, "missing"), (unexpected, "unexpected")) if keys]
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} of another shape (e.g. {k}: saved {tuple(saved[k].shape)}, "
                     f"here {tuple(here[k].shape)})")
    return ", ".join(parts)

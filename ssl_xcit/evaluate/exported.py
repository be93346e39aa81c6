"""A finished feature export (:mod:`ssl_xcit.evaluate.export`) opened for search and cleaning.

:func:`open_export` checks the folder once, before anything is computed or written: it must hold an
ssl_xcit export, complete, its files the size the manifest recorded. :func:`read_descriptors` then
reads one descriptor (:mod:`ssl_xcit.evaluate.descriptors`) shard by shard -- patch tokens through a
memory map, a shard at a time, since an export's patch tokens are often larger than memory.

The export's *fingerprint* (a sha256 over the manifest's model, settings and every shard file's
sha256) names its contents: an index or a result derived from an export records it, and a later
run that finds another fingerprint knows the export was redone and rebuilds.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ssl_xcit.errors import UserError, hinted
from ssl_xcit.evaluate.descriptors import describe, outputs_for
from ssl_xcit.evaluate.export import FORMAT, MANIFEST, shard_is_done, shard_name


class ExportReadError(UserError, ValueError):
    """A folder that is not a finished, intact feature export, or one that lacks what is asked of it."""


@dataclass
class ExportView:
    """A checked, complete export: its folder and manifest (features are read on demand)."""

    folder: Path
    manifest: dict

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def outputs(self) -> list[str]:
        return list(self.manifest["config"]["outputs"])

    @property
    def source(self) -> dict:
        """What made the features: checkpoint, its sha256, arch, crop and resize, seed."""
        return dict(self.manifest["config"].get("source") or {})

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.manifest)

    def paths(self) -> list[str]:
        """Absolute image path of every row (``#<row>`` where the export recorded no paths)."""
        root = Path(self.manifest.get("root") or "")
        out: list[str] = []
        for rec in self.manifest["shards"]:
            name = f"{shard_name(rec['shard'])}.paths.json"
            if name in rec["files"]:
                out += [str(root / p) for p in json.loads((self.folder / name).read_text())]
            else:
                out += [f"#{len(out) + j}" for j in range(rec["rows"])]
        return out


def fingerprint(manifest: dict) -> str:
    """sha256 of what defines an export's rows: model, settings, every shard's files and their sha256."""
    keys = ("model", "config", "shards", "rows", "root")
    text = json.dumps({k: manifest.get(k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _not_an_export(folder: Path, why: str) -> UserError:
    return hinted(ExportReadError, f"{folder} is not a feature export ({why})",
                  "make one with ssl_xcit.evaluate.export.export_features", needs="make_export")


def open_export(folder: str | os.PathLike) -> ExportView:
    """The export in ``folder``, checked: one clear error for a folder that is none, an interrupted
    export, or files that changed size since (a copy in progress, a damaged disk)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ExportReadError(f"{folder}: no such folder (the features are a folder written by an export)")
    path = folder / MANIFEST
    if not path.is_file():
        raise _not_an_export(folder, f"no {MANIFEST} in it")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise _not_an_export(folder, f"{MANIFEST} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _not_an_export(folder, f"{MANIFEST} is not an ssl_xcit feature manifest")
    if not manifest.get("complete"):
        n = int(manifest.get("num_shards", 0))
        done = sum(shard_is_done(folder, i, check_sha=False) is not None for i in range(n))
        raise hinted(ExportReadError, f"the export in {folder} is incomplete ({done} of {n} shards written: it "
                     "was interrupted or is still running)", "run the same export again to finish it",
                     needs="finish_export")
    for rec in manifest["shards"]:
        for fname, want in rec["files"].items():
            p = folder / fname
            if not p.is_file() or p.stat().st_size != want["bytes"]:
                raise ExportReadError(f"{p} is missing or changed size since the export: the export is damaged; "
                                      "export again")
    return ExportView(folder, manifest)


def check_can_describe(view: ExportView, descriptor: str) -> None:
    """The export holds the outputs ``descriptor`` is made of (checked before any work)."""
    missing = [n for n in outputs_for(descriptor) if n not in view.outputs]
    if not missing:
        return
    have = ", ".join(view.outputs)
    if "patch" in missing:
        raise hinted(ExportReadError, f"descriptor {descriptor!r} needs the patch tokens (GeM pools them), but the "
                     f"export in {view.folder} holds only {have}",
                     "export again with outputs=('cls', 'patch'), or use descriptor 'cls'", needs="patch_tokens")
    raise hinted(ExportReadError, f"descriptor {descriptor!r} needs the CLS features, but the export in "
                 f"{view.folder} holds only {have}", "export again with 'cls' among the outputs",
                 needs="cls_features")


def _shard_arrays(view: ExportView, rec: dict, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    stem = shard_name(rec["shard"])
    if "npy" in view.manifest["config"]["formats"]:
        return {n: np.load(view.folder / f"{stem}.{n}.npy", mmap_mode="r", allow_pickle=False) for n in names}
    from safetensors import safe_open
    with safe_open(str(view.folder / f"{stem}.safetensors"), framework="np") as f:
        return {n: f.get_tensor(n) for n in names}


def read_descriptors(view: ExportView, descriptor: str = "cls", chunk: int = 512, normalize: bool = True,
                     progress: bool = False) -> np.ndarray:
    """``(rows, D)`` float32 descriptors of every row of the export, in row order, L2-normalised
    unless ``normalize=False``. Patch tokens are pooled ``chunk`` rows at a time."""
    from tqdm import tqdm
    check_can_describe(view, descriptor)
    names = outputs_for(descriptor)
    parts: list[np.ndarray] = []
    for rec in tqdm(view.manifest["shards"], desc="read features", unit="shard", disable=not progress):
        arrays = _shard_arrays(view, rec, names)
        if names == ("cls",):
            x = torch.from_numpy(np.array(arrays["cls"], dtype=np.float32))
            parts.append(describe({"cls": x}, "cls", normalize).numpy())
            continue
        for s in range(0, rec["rows"], chunk):
            outs = {n: torch.from_numpy(np.array(arrays[n][s:s + chunk], dtype=np.float32)) for n in names}
            parts.append(describe(outs, descriptor, normalize).numpy())
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)

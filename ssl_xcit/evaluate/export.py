"""Export frozen-backbone features for downstream work: sharded ``.npy`` / ``.safetensors`` files
plus ``manifest.json``, resumable after an interruption.

Layout of ``out_dir`` (shard ``i`` holds dataset images ``[i*shard_size, (i+1)*shard_size)``)::

    manifest.json                    settings, classes, and (once complete) every shard's record
    shard-00000.cls.npy              (rows, D) final CLS features       } --format npy
    shard-00000.patch.npy            (rows, P, D) patch tokens          } (--patch-tokens)
    shard-00000.last_blocks.npy      (rows, n*D) last-n-block CLS       } (--n-last-blocks n)
    shard-00000.dense3.npy           (rows, D, H/p, W/p) map of XCA block 3 } (--dense-blocks 3,5,7,11;
    shard-00000.densefinal.npy       (rows, D, H/p, W/p) final normed patch tokens }  'final')
    shard-00000.label.npy            (rows,) class index (class layout only)
    shard-00000.index.npy            (rows,) dataset index of each row
    shard-00000.safetensors          the same arrays in one file        } --format safetensors
    shard-00000.paths.json           image paths relative to the dataset root, one per row
    shard-00000.done.json            the shard's record: rows, byte size and sha256 of every file

Every file is written atomically and a shard's ``done.json`` last, so a shard with a record whose
sizes and checksums still match is finished and kept on resume; anything else is redone. Corrupt
images are skipped (``index`` says which images the rows are). Under torchrun shard ``i`` is
written by rank ``i % world_size``; batches never cross shards, so the bytes do not depend on the
number of ranks or on where a run was interrupted.

A resumed export never mixes two models: the manifest records a sha256 of the backbone's weights
(``model.weights_sha256``) and, from the command line, of the checkpoint file
(``config.source.checkpoint_sha256``) with every option that shapes the features; a rerun with
anything else is refused (``--overwrite`` starts the export over).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ssl_xcit import distributed as du
from ssl_xcit.errors import SETTING, UserError, hinted, named
from ssl_xcit.evaluate import backbone, datasets, runtime
from ssl_xcit.evaluate.inputs import SourceSettings, check_positive
from ssl_xcit.atomic import atomic_write, atomic_write_json, check_writable, file_sha256, remove_orphans_in

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "ssl_xcit-features"
VERSION = 1
FORMATS = ("npy", "safetensors")
DTYPES = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16)}
_EXPORT_FILE = re.compile(r"shard-\d{5}\.[\w.]+")


class ExportError(UserError, ValueError):
    """An export that cannot start or resume as asked (other settings or weights in its folder, a bad
    setting); the message says what to do. A ``ValueError`` too, as before."""


@dataclass(frozen=True)
class ExportConfig:
    """What is exported; a resumed export must use the same settings (checked)."""

    outputs: tuple[str, ...] = ("cls",)
    n_last_blocks: int = 0  # > 0 adds "last_blocks"
    shard_size: int = 10000
    formats: tuple[str, ...] = ("npy",)
    dtype: str = "float32"
    source: dict = field(default_factory=dict)  # checkpoint, arch, crop... recorded in the manifest
    dense_blocks: tuple = ()  # XCA block indices / "final": one (D, H/p, W/p) map each, "dense<i>"

    def __post_init__(self) -> None:
        if not self.outputs or any(o not in ("cls", "patch", "last_blocks") and not o.startswith("dense")
                                   for o in self.outputs):
            raise ExportError(f"outputs must be among cls, patch, last_blocks; got {self.outputs}")
        if ("last_blocks" in self.outputs) != (self.n_last_blocks > 0):
            raise ExportError("'last_blocks' is exported exactly when n_last_blocks > 0 "
                             f"(outputs={self.outputs}, n_last_blocks={self.n_last_blocks})")
        check_positive(self.shard_size, "shard_size")
        if not self.formats or any(f not in FORMATS for f in self.formats):
            raise named(ExportError, f"{SETTING} must be npy, safetensors or both; got {self.formats}", "formats")
        if self.dtype not in DTYPES:
            raise named(ExportError, f"{SETTING} must be one of {sorted(DTYPES)}, got {self.dtype!r}", "dtype")


def dense_key(block: int | str) -> str:
    """The array name of a dense map: ``dense3`` for XCA block 3, ``densefinal`` for the final tokens."""
    return f"dense{block}"


def dense_outputs(model: nn.Module, blocks: Sequence[int | str]) -> Callable[[torch.Tensor], dict]:
    """``images -> {dense_key(b): (B, D, H/p, W/p)}`` for the blocks (see :mod:`ssl_xcit.models.dense`)."""
    from ssl_xcit.models.dense import DenseFeatures
    dense = DenseFeatures(model, tuple(blocks))

    def maps(images: torch.Tensor) -> dict:
        return {dense_key(b): m for b, m in zip(dense.out_indices, dense(images))}
    return maps


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes, bytes): which weights the features
    come from, whatever file or object they were loaded from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _write_npy(path: Path, arr: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a temp name
            np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
    atomic_write(path, write)


def _write_safetensors(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save
    data = save({k: np.ascontiguousarray(v) for k, v in arrays.items()})

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def shard_is_done(out_dir: Path, i: int, check_sha: bool = True) -> dict | None:
    """The shard's record when every file it lists is intact, else ``None``."""
    rec_path = out_dir / f"{shard_name(i)}.done.json"
    if not rec_path.is_file():
        return None
    try:
        rec = json.loads(rec_path.read_text())
        for fname, want in rec["files"].items():
            p = out_dir / fname
            if not p.is_file() or p.stat().st_size != want["bytes"]:
                return None
            if check_sha and file_sha256(p) != want["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rec


def _relative_paths(dataset: Dataset, indices: np.ndarray) -> list[str] | None:
    files = getattr(dataset, "files", None)
    if files is not None:
        return [str(files[i]) for i in indices]
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return None
    root = getattr(dataset, "root", None)
    return [os.path.relpath(samples[i][0], root) if root else str(samples[i][0]) for i in indices]


def _manifest_base(cfg: ExportConfig, dataset: Dataset, weights: str) -> dict:
    classes = list(getattr(dataset, "classes", []) or [])
    config = {**asdict(cfg), "outputs": list(cfg.outputs), "formats": list(cfg.formats),
              "dense_blocks": list(cfg.dense_blocks)}
    if not cfg.dense_blocks:   # recorded only when used: exports written before it existed still resume
        del config["dense_blocks"]
    return {"format": FORMAT, "version": VERSION, "complete": False, "model": {"weights_sha256": weights},
            "config": config,
            "num_images": len(dataset), "num_shards": -(-len(dataset) // cfg.shard_size),
            "root": str(getattr(dataset, "root", "")), "classes": classes, "has_labels": bool(classes)}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _start_over(problem: str) -> ExportError:
    """An export that this folder's earlier one refuses: another folder, or starting over, gets past it."""
    return hinted(ExportError, problem, "pass another out folder, or overwrite=True to start this export over",
                  needs="start_over")


def _check_existing(out_dir: Path, base: dict) -> None:
    """Refuse to resume an export in ``out_dir`` made from other weights or with other settings."""
    path = out_dir / MANIFEST
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except ValueError as err:
        raise _start_over(f"{path} is not valid JSON ({err})") from err
    if not isinstance(old, dict) or old.get("format") != FORMAT:
        raise _start_over(f"{path} is not an ssl_xcit feature export")
    old_src, new_src = old.get("config", {}).get("source", {}), base["config"]["source"]
    old_sha, new_sha = old_src.get("checkpoint_sha256"), new_src.get("checkpoint_sha256")
    if (old_sha or new_sha) and old_sha != new_sha:
        def ident(src: dict, sha: str | None) -> str:
            what = f"checkpoint {src.get('checkpoint')}"
            return f"{what} with sha256 {sha[:16]}..." if sha else f"{what} (no file hash recorded)"
        raise _start_over(f"{out_dir} holds features of {ident(old_src, old_sha)}, but this export reads "
                          f"{ident(new_src, new_sha)}: resuming would mix two models")
    old_w, new_w = old.get("model", {}).get("weights_sha256"), base["model"]["weights_sha256"]
    if old_w != new_w:
        was = f"weights sha256 {old_w[:16]}..." if old_w else "weights not recorded (older ssl_xcit)"
        raise _start_over(f"{out_dir} holds features of other weights ({was}; this model's: {new_w[:16]}...): "
                          "resuming would mix two models")
    keys = ("config", "num_images", "num_shards", "root", "classes")
    old_flat, new_flat = _flat({k: old.get(k) for k in keys}), _flat({k: base[k] for k in keys})
    if new_sha is not None:  # same file contents: where it lies now does not matter
        old_flat.pop("config.source.checkpoint", None)
        new_flat.pop("config.source.checkpoint", None)
    diff = [k for k in sorted(set(old_flat) | set(new_flat)) if old_flat.get(k) != new_flat.get(k)]
    if diff:
        detail = "; ".join(f"{k}: {old_flat.get(k)!r} -> {new_flat.get(k)!r}" for k in diff)[:600]
        raise _start_over(f"{out_dir} holds an export with other settings ({detail})")


def _remove_export(out_dir: Path) -> None:
    """Delete the files of an ssl_xcit export in ``out_dir`` (manifest, shard files); others stay."""
    if not out_dir.is_dir():
        return
    for p in out_dir.iterdir():
        if p.is_file() and (p.name == MANIFEST or _EXPORT_FILE.fullmatch(p.name)):
            p.unlink()


def _open_export(out_dir: Path, base: dict, overwrite: bool) -> None:
    """Check an earlier export against ``base`` (or remove it with ``overwrite``), then lay out the
    folder and its incomplete manifest on rank 0 while the other ranks wait."""
    if not overwrite:
        _check_existing(out_dir, base)  # on every rank, so all of them fail alike
    if du.get_rank() == 0:
        if overwrite:
            _remove_export(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_orphans_in(out_dir)  # temp files of killed writers (never a live writer's)
        if not (out_dir / MANIFEST).is_file():
            atomic_write_json(out_dir / MANIFEST, base, indent=2)
    du.barrier()


def export_features(model: nn.Module, dataset: Dataset, out_dir: str | os.PathLike, *,
                    outputs: Sequence[str] = ("cls",), n_last_blocks: int = 0, shard_size: int = 10000,
                    formats: Sequence[str] = ("npy",), dtype: str = "float32", batch_size: int = 128,
                    num_workers: int = 4, device: torch.device | str = "cpu", progress: bool = True,
                    source: dict | None = None, check_sha: bool = True, overwrite: bool = False,
                    on_shard_done: Callable[[int], None] | None = None, dense_blocks: Sequence[int | str] = ()
                    ) -> dict:
    """Write (or finish) a sharded export of ``model``'s features over ``dataset``; returns the manifest.

    ``outputs``: ``cls`` and optionally ``patch``; ``last_blocks`` is added when ``n_last_blocks``
    > 0. ``source`` (checkpoint, its ``checkpoint_sha256``, arch, crop...) is recorded and must match
    on resume, as must the weights themselves; ``overwrite`` deletes an earlier export in ``out_dir``
    instead. ``on_shard_done(i)`` is called after shard ``i`` is complete (progress hooks, tests).
    ``dense_blocks`` (XCA block indices, ``"final"``) adds one (D, H/p, W/p) map per block and image,
    ``dense<i>``; every image of the dataset must then come at one size (resize them in its transform).
    """
    from tqdm import tqdm

    if dense_blocks:
        from ssl_xcit.models.dense import normalize_out_indices
        dense_blocks = normalize_out_indices(tuple(dense_blocks), len(model.blocks))
    outs = tuple(dict.fromkeys([*outputs, *(["last_blocks"] if n_last_blocks > 0 else []),
                                *(dense_key(b) for b in dense_blocks)]))
    cfg = ExportConfig(outputs=outs, n_last_blocks=n_last_blocks, shard_size=shard_size, formats=tuple(formats),
                       dtype=dtype, source=dict(source or {}), dense_blocks=tuple(dense_blocks))
    if model.training:
        raise ValueError("export the features of a frozen backbone: call model.eval() first")
    if len(dataset) == 0:
        raise ValueError("cannot export features of an empty dataset")
    out_dir = Path(out_dir)
    base = _manifest_base(cfg, dataset, weights_sha256(model))
    _open_export(out_dir, base, overwrite)
    rank, world = du.get_rank(), du.get_world_size()
    model.to(device)
    n_shards = base["num_shards"]
    mine = [i for i in range(n_shards) if i % world == rank]
    todo = [i for i in mine if shard_is_done(out_dir, i, check_sha) is None]
    if rank == 0 and len(todo) < len(mine):
        print(f"export {out_dir}: {len(mine) - len(todo)} finished shard(s) kept, {len(todo)} to do")
    n_todo = sum(min((i + 1) * shard_size, len(dataset)) - i * shard_size for i in todo)
    bar = tqdm(total=n_todo, desc="export", unit="img", disable=not (progress and rank == 0), dynamic_ncols=True)
    for i in todo:
        bar.set_postfix_str(f"shard {i + 1}/{n_shards}", refresh=False)
        arrays, skipped = _shard_features(model, dataset, i, cfg, base, batch_size, num_workers, device, bar)
        _write_shard(out_dir, i, arrays, skipped, cfg, dataset)
        if on_shard_done is not None:
            on_shard_done(i)
    bar.close()
    du.barrier()
    manifest = _complete_manifest(out_dir, base, cfg) if rank == 0 else dict(base)
    du.barrier()
    return manifest


def _shard_features(model: nn.Module, dataset: Dataset, i: int, cfg: ExportConfig, base: dict, batch_size: int,
                    num_workers: int, device, bar) -> tuple[dict[str, np.ndarray], int]:
    """Shard ``i``'s arrays (each output, ``index``, ``label`` when the data has labels) and its skipped count."""
    from ssl_xcit.evaluate.features import feature_loader, iter_outputs
    start, stop = i * cfg.shard_size, min((i + 1) * cfg.shard_size, len(dataset))
    names = list(cfg.outputs)
    torch_dtype, np_dtype = DTYPES[cfg.dtype]
    loader = feature_loader(dataset, range(start, stop), batch_size, num_workers, device)
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    labels, indices, skipped = [], [], 0
    extra = dense_outputs(model, cfg.dense_blocks) if cfg.dense_blocks else None
    plain = [n for n in names if not n.startswith("dense")] or ["cls"]
    for out, lab, idx, n_skip in _checked_sizes(iter_outputs(model, loader, plain, device, max(cfg.n_last_blocks, 1),
                                                             torch_dtype, progress=False, extra=extra), base):
        bar.update(len(idx) + n_skip)
        skipped += n_skip
        if out:
            for n in names:
                parts[n].append(out[n])
            labels.append(lab)
            indices.append(idx)
    if not indices:
        raise ExportError(f"shard {i}: every image in [{start}, {stop}) of {base['root']} is unreadable")
    arrays = {n: torch.cat(parts[n]).numpy().astype(np_dtype, copy=False) for n in names}
    arrays["index"] = torch.cat(indices).numpy().astype(np.int64)
    if base["has_labels"]:
        arrays["label"] = torch.cat(labels).numpy().astype(np.int64)
    return arrays, skipped


def _checked_sizes(batches, base: dict):
    """Batches of images of unequal sizes (a dense export at each image's own size) fail in the
    loader's stacking; say so in one line."""
    try:
        yield from batches
    except RuntimeError as err:
        if "stack expects each tensor to be equal size" not in str(err):
            raise
        raise hinted(ExportError, f"the images of {base['root']} differ in size, so their dense maps cannot "
                     "share a shard", "resize them all to one size in the dataset's transform",
                     needs="dense_size") from None


def _write_shard(out_dir: Path, i: int, arrays: dict[str, np.ndarray], skipped: int, cfg: ExportConfig,
                 dataset: Dataset) -> None:
    """Write shard ``i``'s files atomically, then its ``.done.json`` record (last: it marks the shard done)."""
    files: list[str] = []
    stem = shard_name(i)
    if "npy" in cfg.formats:
        for key, arr in arrays.items():
            _write_npy(out_dir / f"{stem}.{key}.npy", arr)
            files.append(f"{stem}.{key}.npy")
    if "safetensors" in cfg.formats:
        _write_safetensors(out_dir / f"{stem}.safetensors", arrays)
        files.append(f"{stem}.safetensors")
    index = arrays["index"]
    paths = _relative_paths(dataset, index)
    if paths is not None:
        atomic_write_json(out_dir / f"{stem}.paths.json", paths)
        files.append(f"{stem}.paths.json")
    start = i * cfg.shard_size
    record = {"shard": i, "start": start, "stop": min(start + cfg.shard_size, len(dataset)), "rows": int(len(index)),
              "skipped": skipped, "row_shapes": {n: list(arrays[n].shape[1:]) for n in cfg.outputs},
              "files": {f: _file_record(out_dir / f) for f in sorted(files)}}
    atomic_write_json(out_dir / f"{stem}.done.json", record, indent=2)


def _complete_manifest(out_dir: Path, base: dict, cfg: ExportConfig) -> dict:
    """Rank 0, after every shard: the manifest with each shard's record, marked complete."""
    records = []
    for i in range(base["num_shards"]):
        rec = shard_is_done(out_dir, i, check_sha=False)
        if rec is None:
            raise RuntimeError(f"{out_dir}: shard {i} has no valid record after the export")
        records.append(rec)
    manifest = dict(base)
    manifest.update(complete=True, shards=records, rows=sum(r["rows"] for r in records),
                    skipped=sum(r["skipped"] for r in records),
                    arrays={n: {"dtype": cfg.dtype, "row_shape": records[0]["row_shapes"][n]} for n in cfg.outputs})
    atomic_write_json(out_dir / MANIFEST, manifest, indent=2)
    return manifest


def load_exported(out_dir: str | os.PathLike, verify: bool = False) -> dict[str, np.ndarray]:
    """All shards of a complete export concatenated: the feature arrays, ``index``, ``label`` (when
    the folder had classes) and ``path`` (str array). ``verify`` re-checks every checksum."""
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir} has no {MANIFEST}: not a feature export")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not an ssl_xcit feature export (format {manifest.get('format')!r})")
    if not manifest.get("complete"):
        done = sum(shard_is_done(out_dir, i, check_sha=False) is not None for i in range(manifest["num_shards"]))
        raise RuntimeError(f"the export in {out_dir} is incomplete ({done} of {manifest['num_shards']} shards): "
                           "run the export again to finish it")
    cfg = manifest["config"]
    names = [*cfg["outputs"], "index", *(["label"] if manifest["has_labels"] else [])]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    paths: list[str] = []
    for rec in manifest["shards"]:
        stem = shard_name(rec["shard"])
        for fname, want in rec["files"].items():
            p = out_dir / fname
            if not p.is_file() or p.stat().st_size != want["bytes"] or (verify and file_sha256(p) != want["sha256"]):
                raise RuntimeError(f"{p} is missing or changed since the export (size/checksum mismatch)")
        if "npy" in cfg["formats"]:
            for n in names:
                parts[n].append(np.load(out_dir / f"{stem}.{n}.npy", allow_pickle=False))
        else:
            from safetensors.numpy import load_file
            arrays = load_file(out_dir / f"{stem}.safetensors")
            for n in names:
                parts[n].append(arrays[n])
        if f"{stem}.paths.json" in rec["files"]:
            paths.extend(json.loads((out_dir / f"{stem}.paths.json").read_text()))
    result = {n: np.concatenate(v) for n, v in parts.items()}
    if paths:
        result["path"] = np.array(paths)
    return result


# --------------------------------------------------------------------------------------------- the tool
@dataclass
class ExportSettings(SourceSettings):
    """An export as :func:`export_folder` runs it (the backbone and images: ``SourceSettings``)."""

    out: str = ""                        # the export's folder (an interrupted export there is resumed)
    split: str | None = None             # sub-folder of data_path to export (train, val); None: data_path
    patch_tokens: bool = False           # also the patch tokens (large)
    n_last_blocks: int = 0               # also the concatenated CLS tokens of the last n blocks
    format: str = "npy"                  # npy, safetensors or both
    shard_size: int = 10000              # images per shard
    dtype: str | None = None             # float16 or float32 (None: float16 with dense_blocks, else float32)
    dense_blocks: list | None = None     # XCA block indices and/or "final": (D, H/p, W/p) maps
    dense_size: tuple[int, int] | None = None   # (H, W) every image is resized to for dense maps
    verify: bool = True                  # on resume, re-read finished shards' sha256
    overwrite: bool = False              # delete an earlier export in out (other checkpoint or settings)


def _transform(s: ExportSettings, model: nn.Module):
    """DINO's eval transform (resize, centre crop); with dense maps the image at ``dense_size``
    (resized, no crop) or at its own size cropped to the patch, so the maps cover the image."""
    if not s.dense_blocks:
        return datasets.eval_transform(s.crop_size, s.resize)
    patch = int(model.patch_embed.patch_size)
    if s.dense_size is not None:
        h, w = s.dense_size
        if h % patch or w % patch:
            raise named(ExportError, f"{SETTING} {h} {w} is not divisible by the patch size {patch}: use multiples of "
                    f"{patch} (e.g. {max(patch, h // patch * patch)} {max(patch, w // patch * patch)})", "dense_size")
        return datasets.eval_transform((h, w), (h, w))
    from torchvision import transforms as T

    def crop(img):
        return T.functional.center_crop(img, [max(patch, img.height // patch * patch),
                                              max(patch, img.width // patch * patch)])
    return T.Compose([T.Lambda(crop), T.ToTensor(), T.Normalize(datasets.IMAGENET_MEAN, datasets.IMAGENET_STD)])


def _file_version(checkpoint: str) -> tuple | None:
    """(inode, size, mtime) of a checkpoint file, ``None`` for a model name: tells a replaced file."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        return None
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _source_folder(s: ExportSettings) -> Path:
    """The folder to export, checked before the model and the images are read."""
    check_positive(s.batch_size, "batch_size")
    if s.n_last_blocks < 0:
        raise named(ExportError, f"{SETTING} must be >= 0, got {s.n_last_blocks}", "n_last_blocks")
    root = datasets.resolve_root(s.data_path)
    folder = root / s.split if s.split else root
    if not folder.is_dir():
        raise named(ExportError, f"{SETTING} {root} has no {s.split}/ folder", "data_path")
    if not s.split and (root / "train").is_dir() and (root / "val").is_dir():
        raise hinted(ExportError, f"{root} holds train/ and val/", "pass split='train' or split='val' (otherwise "
                     "they would be exported as two classes)", needs="split")
    check_writable(s.out)   # a read-only folder: one line now, not after the model and the images are read
    return folder


def export_folder(s: ExportSettings) -> dict:
    """Export ``s``'s backbone features of the images in ``s.data_path`` (``/s.split``) to ``s.out``
    (resumed when an interrupted export of the same model and settings is there); the manifest
    (``{}`` on ranks other than 0)."""
    s = replace(s, batch_size=128 if s.batch_size is None else s.batch_size,   # the caller's settings stay
                dtype=s.dtype or ("float16" if s.dense_blocks else "float32"))
    folder = _source_folder(s)
    env = runtime.setup_env(s.device, s.seed)
    try:
        version = _file_version(s.checkpoint)  # the file hashed must be the file loaded
        sha = file_sha256(Path(s.checkpoint).expanduser()) if version is not None else None
        model = backbone.load_frozen_backbone(s.checkpoint, s.arch, s.checkpoint_key, env.device, seed=s.seed)
        if _file_version(s.checkpoint) != version:
            raise ExportError(f"{s.checkpoint} changed while it was read (a training still writing it?); "
                              "run the export again once it is stable")
        if s.n_last_blocks:
            backbone.check_n_last_blocks(model, s.n_last_blocks)
        dataset = datasets.open_images(folder, _transform(s, model))   # after the model: the patch size
        formats = FORMATS if s.format == "both" else (s.format,)
        source = {"checkpoint": str(s.checkpoint), "checkpoint_sha256": sha, "arch": s.arch,
                  "checkpoint_key": s.checkpoint_key, "crop_size": s.crop_size,
                  "resize": datasets.resize_for(s.crop_size, s.resize), "seed": s.seed,
                  **({"dense_size": s.dense_size or "own"} if s.dense_blocks else {})}
        outputs = ("cls", "patch") if s.patch_tokens else ("cls",)
        manifest = export_features(model, dataset, s.out, outputs=outputs, n_last_blocks=s.n_last_blocks,
                                   shard_size=s.shard_size, formats=formats, dtype=s.dtype,
                                   batch_size=s.batch_size, num_workers=s.num_workers, device=env.device,
                                   progress=s.progress, source=source, check_sha=s.verify,
                                   overwrite=s.overwrite, dense_blocks=s.dense_blocks or ())
        if env.is_main:
            print(f"exported {manifest['rows']} images in {manifest['num_shards']} shard(s) to {s.out}")
        return manifest if env.is_main else {}
    finally:
        runtime.teardown_env(env)

"""Video object segmentation by label propagation: DINO's DAVIS protocol, for XCiT, on a laptop.

The protocol (DINO's ``eval_video_segmentation.py``): frames resized to 480 px on the short side
(the long side floored to a multiple of 64), patch features L2-normalised per token; the labels of
the first frame (its annotation, one channel per object) and of the ``n_last_frames`` (7) frames
before are propagated to each new frame: every target patch takes the softmax-at-temperature-0.1
weighted labels of its ``topk`` (5) most similar source patches, sources restricted to a
(2r+1) x (2r+1) window around it (``size_mask_neighborhood`` r = 12). The soft labels are upsampled
bilinearly by the patch size, min-max normalised per object, arg-maxed, resized (nearest) to the
frame and written as indexed PNGs with the annotation's palette, one folder per sequence.

Patch features: DINO reads its ViT's final normed patch tokens; for XCiT the default is the output of
the third-last XCA block, which served better here (see ``DEFAULT_FEATURES``); ``features="final"``
gives DINO's choice.

What differs from DINO's code, and why: DINO builds the dense (h w) x (n h w) affinity and then
multiplies it by a mask of the window; at 480x832 with patch 8 that is 8 x 6240 x 6240 floats
(1.2 GB) plus a mask of the same size, per frame. :func:`propagate_labels` computes, for each tile of
``tile`` x ``tile`` target patches, only the similarities to the sources in the window around that
tile, and keeps one tile's products at a time (a few MB); the result is the same up to
floating-point rounding (tested against DINO's dense computation).

Scoring (:mod:`ssl_xcit.evaluate.davis_metrics`) reads the PNGs back, so what is scored is what
was written.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ssl_xcit.errors import UserError

log = logging.getLogger(__name__)

N_LAST_FRAMES = 7
SIZE_MASK_NEIGHBORHOOD = 12
TOPK = 5
TEMPERATURE = 0.1
SHORT_SIDE = 480
# The third-last XCA block (block 9 of 12): on the 3 hardest DAVIS clips at 480p it beat the final normed
# patch tokens (DINO's choice) on 159 of 248 frames (+0.55 J&F, sign test p = 5e-6) and block 11 by less
# (benchmarks/RESULTS.md, "Which tokens serve XCiT best"); measured with one XCiT-nano/8 teacher only.
DEFAULT_FEATURES = "-3"
# DINO's color_normalize (note 0.228, not ImageNet's 0.229: kept, so features match DINO's)
MEAN = (0.485, 0.456, 0.406)
STD = (0.228, 0.224, 0.225)


class VideoInputError(UserError, ValueError):
    """A DAVIS folder, sequence, frame or mask this evaluation cannot read as asked."""


# ----------------------------------------------------------------------------- propagation
def _window_mask(th: int, tw: int, radius: int) -> torch.Tensor:
    """(th*tw, wh*ww) booleans: target (qy, qx) of a tile sees window key (ky, kx), the window
    starting ``radius`` above and left of the tile, when 0 <= ky - qy <= 2r and 0 <= kx - qx <= 2r."""
    wh, ww = th + 2 * radius, tw + 2 * radius
    qy, qx = torch.meshgrid(torch.arange(th), torch.arange(tw), indexing="ij")
    ky, kx = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    dy = ky.reshape(1, -1) - qy.reshape(-1, 1)
    dx = kx.reshape(1, -1) - qx.reshape(-1, 1)
    return (dy >= 0) & (dy <= 2 * radius) & (dx >= 0) & (dx <= 2 * radius)


def propagate_labels(target: torch.Tensor, sources: torch.Tensor, source_labels: torch.Tensor,
                     size_mask_neighborhood: int = SIZE_MASK_NEIGHBORHOOD, topk: int = TOPK,
                     temperature: float = TEMPERATURE, tile: int = 8) -> torch.Tensor:
    """Soft labels (K, h, w) of ``target`` from its ``topk`` most similar source patches.

    ``target`` (C, h, w) and ``sources`` (n, C, h, w): L2-normalised patch features of the target
    frame and of the n context frames; ``source_labels`` (n, K, h, w): their (soft) labels. Each
    target patch looks only at source patches within ``size_mask_neighborhood`` patches in both
    directions (0: everywhere, as DINO's 0); its labels are the weighted sum of the labels of its
    ``topk`` most similar ones, weights ``softmax(similarity / temperature)`` over those k (DINO's
    exp(sim / 0.1) of the k kept, divided by their sum). Only one tile's similarities exist at a time.
    """
    n, c, h, w = sources.shape
    k = source_labels.shape[1]
    r = int(size_mask_neighborhood)
    if r <= 0:   # no window: the whole frame is every patch's neighbourhood
        r, tile = 0, max(h, w)
    src = F.pad(sources, (r, r, r, r))
    lab = F.pad(source_labels.to(sources.dtype), (r, r, r, r))
    valid = F.pad(torch.ones(h, w, dtype=torch.bool, device=sources.device), (r, r, r, r))
    out = torch.empty(k, h, w, dtype=sources.dtype, device=sources.device)
    masks: dict[tuple[int, int], torch.Tensor] = {}
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            th, tw = min(tile, h - y0), min(tile, w - x0)
            wh, ww = th + 2 * r, tw + 2 * r
            if (th, tw) not in masks:
                masks[th, tw] = (_window_mask(th, tw, r) if r else torch.ones(th * tw, wh * ww, dtype=torch.bool)
                                 ).to(sources.device)
            allowed = masks[th, tw] & valid[y0:y0 + wh, x0:x0 + ww].reshape(1, -1)
            q = target[:, y0:y0 + th, x0:x0 + tw].reshape(c, -1).t()                     # (tq, C)
            keys = src[:, :, y0:y0 + wh, x0:x0 + ww].permute(1, 0, 2, 3).reshape(c, -1)   # (C, n*wh*ww)
            sim = (q @ keys).view(th * tw, n, wh * ww)
            sim.masked_fill_(~allowed.unsqueeze(1), float("-inf"))
            vals, idx = sim.reshape(th * tw, -1).topk(min(topk, n * wh * ww), dim=1)
            weights = torch.softmax(vals / temperature, dim=1)                          # (tq, topk)
            labels = lab[:, :, y0:y0 + wh, x0:x0 + ww].permute(0, 2, 3, 1).reshape(-1, k)  # (n*wh*ww, K)
            soft = (weights.unsqueeze(-1) * labels[idx]).sum(dim=1)                      # (tq, K)
            out[:, y0:y0 + th, x0:x0 + tw] = soft.t().reshape(k, th, tw)
    return out


def labels_to_mask(soft: torch.Tensor, patch: int, size: tuple[int, int]) -> np.ndarray:
    """DINO's last step: soft labels (K, h, w) upsampled bilinearly by ``patch``, each channel
    min-max normalised (when not constant), arg-maxed, resized (nearest) to ``size`` = (H, W)."""
    from PIL import Image
    up = F.interpolate(soft[None].float(), scale_factor=patch, mode="bilinear", align_corners=False)[0]
    lo = up.amin(dim=(1, 2), keepdim=True)
    span = up.amax(dim=(1, 2), keepdim=True) - lo
    up = torch.where(span > 0, (up - lo) / span.clamp_min(1e-12), up)
    label = up.argmax(dim=0).to(torch.uint8).cpu().numpy()
    return np.asarray(Image.fromarray(label).resize((size[1], size[0]), Image.NEAREST))


# ----------------------------------------------------------------------------- DAVIS folders
@dataclass
class VideoSequence:
    """One sequence of a DAVIS-layout folder: its frames (sorted) and its annotation folder."""

    name: str
    frames: list[Path]
    annotations: Path

    def mask_path(self, frame: Path) -> Path:
        return self.annotations / (frame.stem + ".png")


def davis_root(path: str | Path) -> Path:
    """The folder holding JPEGImages/: ``path`` itself, or its ``DAVIS/`` (as the archives unpack)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise VideoInputError(f"{root}: no such folder (expected a DAVIS folder with JPEGImages/ and Annotations/)")
    if not (root / "JPEGImages").is_dir() and (root / "DAVIS" / "JPEGImages").is_dir():
        root = root / "DAVIS"
    return root


def davis_sequences(path: str | Path, resolution: str = "480p", split: str = "2017/val",
                    names: Sequence[str] | None = None) -> list[VideoSequence]:
    """The sequences of a DAVIS-2017-layout folder: ``names``, else those listed in
    ``ImageSets/<split>.txt``, else every folder of ``JPEGImages/<resolution>``; every sequence must
    have frames and a first-frame annotation (one-line errors naming what is missing)."""
    root = davis_root(path)
    jpeg, ann = root / "JPEGImages" / resolution, root / "Annotations" / resolution
    for folder, what in ((jpeg, "frames"), (ann, "annotations")):
        if not folder.is_dir():
            raise VideoInputError(f"{root}: no {folder.relative_to(root)}/ folder ({what}); a DAVIS-2017 layout "
                                  f"has JPEGImages/{resolution}/<sequence>/*.jpg and "
                                  f"Annotations/{resolution}/<sequence>/*.png")
    listing = root / "ImageSets" / f"{split}.txt"
    if names is None:
        names = ([s.strip() for s in listing.read_text().splitlines() if s.strip()] if listing.is_file()
                 else sorted(p.name for p in jpeg.iterdir() if p.is_dir()))
    out = []
    for name in names:
        frames = sorted((jpeg / name).glob("*.jpg"))
        if not frames:
            raise VideoInputError(f"sequence {name!r}: no frames (*.jpg) in {jpeg / name}")
        seq = VideoSequence(name, frames, ann / name)
        if not seq.mask_path(frames[0]).is_file():
            raise VideoInputError(f"sequence {name!r} has no first-frame mask: {seq.mask_path(frames[0])} is missing")
        out.append(seq)
    if not out:
        raise VideoInputError(f"{root}: no sequence to evaluate")
    return out


def default_palette() -> list[int]:
    """DAVIS's (PASCAL VOC's) 256-colour palette, for masks stored without one."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def read_mask(path: Path, size: tuple[int, int] | None = None) -> tuple[np.ndarray, list[int]]:
    """A label mask (H, W) uint8 and its palette (the default one for a mask without); one-line
    errors for a size other than ``size`` (H, W) and for indices the palette has no colour for."""
    from PIL import Image
    with Image.open(path) as im:
        mode, palette = im.mode, im.getpalette() if im.mode == "P" else None
        arr = np.array(im.convert("L") if mode not in ("P", "L") else im, dtype=np.uint8)
    if size is not None and arr.shape != tuple(size):
        raise VideoInputError(f"{path}: mask is {arr.shape[1]}x{arr.shape[0]} but its frame is "
                              f"{size[1]}x{size[0]} (width x height)")
    palette = palette or default_palette()
    colours = len(palette) // 3
    top = int(arr.max(initial=0))
    if top >= colours:
        raise VideoInputError(f"{path}: mask index {top} is beyond its palette of {colours} colours "
                              f"(indices 0..{colours - 1})")
    return arr, palette


def frame_size(height: int, width: int, scale_size: Sequence[int], patch: int) -> tuple[int, int, str | None]:
    """(H, W) a frame is resized to, and a note when a side had to be rounded to the patch.

    ``scale_size`` (DINO's): one value, the short side (the long side in proportion, floored to a
    multiple of 64 as DINO does), or (H, W)."""
    if len(scale_size) == 1:
        s = int(scale_size[0])
        if height > width:
            th, tw = int((s * height / width) // 64 * 64), s
        else:
            th, tw = s, int((s * width / height) // 64 * 64)
    else:
        th, tw = int(scale_size[0]), int(scale_size[1])
    note = None
    if th % patch or tw % patch:
        nh, nw = max(patch, th // patch * patch), max(patch, tw // patch * patch)
        note = f"frame size {tw}x{th} is not divisible by the patch {patch}: resized to {nw}x{nh}"
        th, tw = nh, nw
    return th, tw, note


def read_frame(path: Path, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """A frame resized (bilinear) to ``size`` = (H, W) and normalised as DINO does: (3, H, W), with
    its original (H, W)."""
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        original = (im.height, im.width)
        im = im.resize((size[1], size[0]), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (x - mean) / std, original


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image, from its header."""
    from PIL import Image
    with Image.open(path) as im:
        return im.height, im.width


def write_indexed_png(path: Path, mask: np.ndarray, palette: list[int]) -> None:
    """An indexed PNG with ``palette``, as DINO's ``imwrite_indexed``; atomic (a crash leaves none)."""
    from PIL import Image

    from ssl_xcit.atomic import atomic_write
    im = Image.fromarray(mask.astype(np.uint8))
    im.putpalette(palette)   # an 'L' image becomes 'P' with these colours
    atomic_write(path, lambda tmp: im.save(tmp, format="PNG"))


# ----------------------------------------------------------------------------- one sequence
@dataclass
class PropagationSettings:
    """DINO's settings (its flag names), and which tokens serve as patch features."""

    n_last_frames: int = N_LAST_FRAMES
    size_mask_neighborhood: int = SIZE_MASK_NEIGHBORHOOD
    topk: int = TOPK
    temperature: float = TEMPERATURE
    scale_size: tuple[int, ...] = (SHORT_SIDE,)
    features: str = DEFAULT_FEATURES   # "final" (normed patch tokens) or an XCA block index (-1: the last)
    tile: int = 8
    max_frames: int | None = None  # the first frames only (for exploration); None: all

    def check(self) -> None:
        for name in ("n_last_frames", "size_mask_neighborhood"):
            if getattr(self, name) < 0:
                raise VideoInputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.topk < 1 or self.tile < 1 or not self.temperature > 0:
            raise VideoInputError(f"topk and tile must be >= 1 and temperature > 0, got topk={self.topk}, "
                                  f"tile={self.tile}, temperature={self.temperature}")
        if self.max_frames is not None and self.max_frames < 3:
            raise VideoInputError(f"max_frames must be >= 3 (the first and last frames are not scored), "
                                  f"got {self.max_frames}")


@torch.no_grad()
def frame_features(dense: torch.nn.Module, frame: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """L2-normalised patch features (C, h, w) of one frame (dense: a one-map DenseFeatures)."""
    fmap = dense(frame.unsqueeze(0).to(device))[0][0].float()
    return F.normalize(fmap, dim=0, p=2)


def first_frame_labels(seq: VideoSequence, size: tuple[int, int], original: tuple[int, int],
                       patch: int) -> tuple[torch.Tensor, np.ndarray, list[int]]:
    """The first annotation as DINO reads it: one-hot (K+1, H/p, W/p) of the mask resized (nearest)
    to the patch grid, K its largest index; plus the mask itself and its palette. Void (255) is
    background here (it is left out of the scores)."""
    from PIL import Image
    mask, palette = read_mask(seq.mask_path(seq.frames[0]), original)
    labels = np.where(mask == 255, 0, mask)
    small = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((size[1] // patch, size[0] // patch),
                                                                       Image.NEAREST))
    k = int(labels.max(initial=0)) + 1
    onehot = F.one_hot(torch.from_numpy(small.astype(np.int64)), k).permute(2, 0, 1).float()
    return onehot, mask, palette


def _features_ahead(dense: torch.nn.Module, frames: Sequence[Path], size: tuple[int, int],
                    device: torch.device | str):
    """Yield ``(path, original (H, W), features)`` per frame; the next frame is read and its features
    computed in a background thread while the caller propagates the current one, so a CPU keeps two
    cores busy (torch releases the GIL) instead of one."""
    from concurrent.futures import ThreadPoolExecutor

    def job(path: Path):
        frame, original = read_frame(path, size)
        return path, original, frame_features(dense, frame, device)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(job, frames[0])
        for nxt in frames[1:]:
            current = pending.result()
            pending = pool.submit(job, nxt)
            yield current
        yield pending.result()


def segment_sequence(dense: torch.nn.Module, seq: VideoSequence, out_dir: Path, settings: PropagationSettings,
                     device: torch.device | str = "cpu", progress: bool = True) -> None:
    """Propagate the first mask of ``seq`` through its frames; writes ``out_dir/<frame>.png`` for each
    frame (the first is the annotation itself, as DINO writes it)."""
    from tqdm import tqdm
    frames = seq.frames[: settings.max_frames]
    patch = int(dense.patch_size)
    original = image_size(frames[0])
    th, tw, _ = frame_size(*original, settings.scale_size, patch)
    seg0, mask0, palette = first_frame_labels(seq, (th, tw), original, patch)
    write_indexed_png(out_dir / (frames[0].stem + ".png"), mask0, palette)
    ahead = _features_ahead(dense, frames, (th, tw), device)
    feat0 = next(ahead)[2]
    seg0 = seg0.to(feat0)
    queue: deque = deque(maxlen=settings.n_last_frames)
    for path, size, feat in tqdm(ahead, total=len(frames) - 1, desc=seq.name, disable=not progress, unit="frame",
                                 dynamic_ncols=True, leave=False):
        if size != original:
            raise VideoInputError(f"{path}: frame is {size[1]}x{size[0]}, the sequence's first is "
                                  f"{original[1]}x{original[0]}")
        sources = torch.stack([feat0] + [f for f, _ in queue])
        labels = torch.stack([seg0] + [s for _, s in queue])
        soft = propagate_labels(feat, sources, labels, settings.size_mask_neighborhood, settings.topk,
                                settings.temperature, settings.tile)
        queue.append((feat, soft))
        write_indexed_png(out_dir / (path.stem + ".png"), labels_to_mask(soft, patch, original), palette)


def score_sequence(seq: VideoSequence, out_dir: Path, max_frames: int | None = None) -> dict[str, np.ndarray]:
    """J and F per object and frame of the PNGs written for ``seq`` against its annotations."""
    from ssl_xcit.evaluate.davis_metrics import score_frames
    preds, gts = [], []
    for frame in seq.frames[:max_frames]:
        pred_path, gt_path = out_dir / (frame.stem + ".png"), seq.mask_path(frame)
        if not gt_path.is_file():
            raise VideoInputError(f"sequence {seq.name!r}: no annotation {gt_path} to score frame {frame.name} "
                                  "(scoring needs every frame annotated, as DAVIS-2017 val)")
        pred, _ = read_mask(pred_path)
        gts.append(read_mask(gt_path, pred.shape)[0])
        preds.append(pred)
    return score_frames(preds, gts)


# ----------------------------------------------------------------------------- the evaluation
RESULT_FILE = "video_segmentation.json"
DONE_FILE = ".done.json"


def _sequence_done(out_dir: Path, fingerprint: dict, n_frames: int) -> bool:
    """A sequence written by an earlier run with the same weights and settings (resume)."""
    import json
    try:
        done = json.loads((out_dir / DONE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return done.get("fingerprint") == fingerprint and done.get("frames") == n_frames and \
        len(list(out_dir.glob("*.png"))) >= n_frames


def _peak_rss_mb() -> float:
    import resource
    import sys
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024


def evaluate_video_segmentation(model: torch.nn.Module, data_path: str | Path, output_dir: str | Path,
                                settings: PropagationSettings | None = None, sequences: Sequence[str] | None = None,
                                device: torch.device | str = "cpu", progress: bool = True,
                                source: dict | None = None) -> dict:
    """Segment every sequence of a DAVIS folder with ``model``'s patch features, score J and F, and
    write ``output_dir/<sequence>/*.png`` and ``output_dir/video_segmentation.json`` (atomic).

    A sequence already written by an earlier run with the same weights and settings is not
    computed again (it is scored again). ``source`` (e.g. the checkpoint's name) goes into the
    result as it is. Returns the result dict.
    """
    import time
    from dataclasses import asdict

    from ssl_xcit.atomic import atomic_write_json
    from ssl_xcit.evaluate.davis_metrics import per_frame_jf, summarize
    from ssl_xcit.evaluate.export import weights_sha256
    from ssl_xcit.models.dense import DenseFeatures
    settings = settings or PropagationSettings()
    settings.check()
    seqs = davis_sequences(data_path, names=sequences)
    if isinstance(model, DenseFeatures):   # already a one-map feature module: used as it is
        dense = model.eval().to(device)
    else:
        index = settings.features if str(settings.features) == "final" else int(settings.features)
        dense = DenseFeatures(model, (index,)).eval().to(device)
    out = Path(output_dir)
    fingerprint = {"weights_sha256": weights_sha256(model), **asdict(settings)}
    fingerprint["scale_size"] = list(settings.scale_size)
    t0, notes, scores, timing = time.perf_counter(), [], {}, {}
    for seq in seqs:
        folder = out / seq.name
        n = len(seq.frames[: settings.max_frames])
        note = frame_size(*image_size(seq.frames[0]), settings.scale_size, int(dense.patch_size))[2]
        if note and note not in notes:
            log.warning("%s", note)
            notes.append(note)
        if not _sequence_done(folder, fingerprint, n):
            ts = time.perf_counter()
            segment_sequence(dense, seq, folder, settings, device, progress)
            timing[seq.name] = time.perf_counter() - ts
            atomic_write_json(folder / DONE_FILE, {"fingerprint": fingerprint, "frames": n})
        scores[seq.name] = score_sequence(seq, folder, settings.max_frames)
        log.info("%s: J %.3f F %.3f", seq.name, scores[seq.name]["J"].mean(), scores[seq.name]["F"].mean())
    result = {**summarize(scores), "per_frame_JF": per_frame_jf(scores).tolist(),
              "settings": fingerprint, "source": source or {}, "notes": notes,
              "seconds": {"total": time.perf_counter() - t0, "segmenting": timing},
              "peak_rss_mb": _peak_rss_mb(), "device": str(device),
              "frames_segmented": int(sum(len(s.frames[: settings.max_frames]) - 1 for s in seqs))}
    atomic_write_json(out / RESULT_FILE, result, indent=1)
    return result

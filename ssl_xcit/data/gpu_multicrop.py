"""DINO multi-crop as batched torch ops on the training device (``data.augment=gpu``).

* :meth:`BatchedMultiCrop.draw` (DataLoader worker, CPU, ~40-80 us per crop): every random
  parameter of one image's crops, drawn with exactly the calls, in exactly the order, that the
  torchvision v2 transforms of :class:`~ssl_xcit.data.multicrop.DinoMultiCrop` make
  (RandomResizedCrop's 10 tries and central fallback, flip, RandomApply + ColorJitter's
  ``randperm(4)`` and factors, grayscale, blur sigma, solarisation on global 2 only), from the
  generator the dataset seeds per sample (``run_seeded``: run seed, epoch, global position). So they
  are the CPU path's very numbers: a fixed seed reproduces a batch and resume stays exact.
* :meth:`BatchedMultiCrop.__call__` (main process, ``run.device``): uint8 images (stacked, or a list
  when sizes differ) + parameters -> the normalised float crops of the ``MultiCropTransform``
  contract, through the batched ops of :mod:`ssl_xcit.data.crop_ops` (crop + antialiased bicubic
  resize as two matmuls, jitter in each crop's own order, per-crop Gaussian blur with the CPU
  path's kernel-size rule).

The ops work in float32 on [0, 1] without the uint8 rounding torchvision's uint8 kernels do after
each op, so pixels differ from the CPU path by a grey level or two (tested); parameters are equal.
Own code rather than kornia: kornia draws other distributions (one jitter order per batch, no
antialiased resize), adds a dependency, and torchvision's functional ops are the test reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ssl_xcit.data.crop_ops import (BLUR, BRIGHT, CONTRAST, FLIP, GRAY, HUE, JITTER, N_PARAMS, O0, O3, SATUR, SIGMA,
                                     SOLAR, TOP, WIDTH, augment_crops, resized_crops)
from ssl_xcit.data.multicrop import MultiCropConfig, blur_kernel_size

_RATIO = (3.0 / 4.0, 4.0 / 3.0)                       # RandomResizedCrop's default ratio
_LOG_RATIO = tuple(torch.log(torch.tensor(_RATIO)).tolist())   # float32 values, as torchvision keeps them


@dataclass
class ImageWithParams:
    """What the loader hands over in gpu mode: the decoded image and its drawn crop parameters."""
    image: torch.Tensor       # uint8 (3, H, W)
    params: torch.Tensor      # float64 (n_crops, N_PARAMS)


def _jitter_range(value: float, center: float, clip: bool) -> tuple[float, float] | None:
    """torchvision ColorJitter._check_input for one number: None when the op is off (no draw)."""
    lo, hi = center - value, center + value
    if clip:
        lo = max(lo, 0.0)
    return None if lo == hi == center else (lo, hi)


class BatchedMultiCrop:
    """Per-image parameter draws (:meth:`draw`) and the batched augmentation (``__call__``)."""

    num_global = 2

    def __init__(self, config: MultiCropConfig | None = None) -> None:
        self.config = cfg = config if config is not None else MultiCropConfig()
        self.num_local = cfg.local_crops_number
        b, c, s, h = cfg.color_jitter
        self._jitter = (_jitter_range(b, 1.0, True), _jitter_range(c, 1.0, True),
                        _jitter_range(s, 1.0, True), _jitter_range(h, 0.0, False))

    @property
    def crop_sizes(self) -> tuple[int, ...]:
        cfg = self.config
        return (cfg.global_crops_size,) * 2 + (cfg.local_crops_size,) * cfg.local_crops_number

    # ------------------------------------------------------------------ drawing (CPU, per image)
    def draw(self, height: int, width: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Parameters of every crop of one ``height x width`` image, (n_crops, N_PARAMS) float64."""
        g = generator if generator is not None else torch.default_generator
        cfg = self.config
        kinds = [(cfg.global_crops_scale, cfg.blur_probs[0], False), (cfg.global_crops_scale, cfg.blur_probs[1], True)]
        kinds += [(cfg.local_crops_scale, cfg.blur_probs[2], False)] * cfg.local_crops_number
        r = _Rng(g)
        return torch.tensor([self._draw_one(height, width, *k, r) for k in kinds], dtype=torch.float64)

    def _draw_one(self, height: int, width: int, scale: Sequence[float], blur_p: float, solarize: bool,
                  r: _Rng) -> list[float]:
        cfg = self.config
        row = [0.0] * N_PARAMS
        row[TOP:WIDTH + 1] = _crop_box(height, width, scale, r)
        row[FLIP] = r.happens(cfg.flip_prob)
        row[BRIGHT:O3 + 1] = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 2.0, 3.0]   # identity factors, order 0 1 2 3
        if r.happens(cfg.color_jitter_prob):
            row[JITTER] = 1.0
            order = torch.randperm(4, generator=r.g).tolist()
            row[O0:O3 + 1] = [op if self._jitter[op] is not None else -1 for op in order]  # -1: op off
            for col, rng in zip((BRIGHT, CONTRAST, SATUR, HUE), self._jitter):
                if rng is not None:
                    row[col] = r.uniform(rng[0], rng[1])
        row[GRAY] = r.happens(cfg.grayscale_prob)
        if r.happens(blur_p):
            row[BLUR] = 1.0
            row[SIGMA] = r.uniform(cfg.blur_sigma[0], cfg.blur_sigma[1])
        if solarize:
            row[SOLAR] = r.happens(cfg.solarize_prob)
        return row

    def loader_transform(self, image: Image.Image) -> ImageWithParams:
        """The dataset's transform in gpu mode: decoded uint8 CHW image + :meth:`draw` (seeded RNG)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return ImageWithParams(tensor, self.draw(tensor.shape[1], tensor.shape[2]))

    # ------------------------------------------------------------------ applying (batched, device)
    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor], params: torch.Tensor,
                 device: torch.device | str | None = None) -> list[torch.Tensor]:
        """uint8 images (B, 3, H, W) or a list of (3, H_i, W_i) + params (B, n_crops, N_PARAMS) ->
        ``n_crops`` float32 tensors (B, 3, size, size), normalised, on ``device``."""
        if params.ndim != 3 or params.shape[1:] != (len(self.crop_sizes), N_PARAMS):
            raise ValueError(f"params must have shape (B, {len(self.crop_sizes)}, {N_PARAMS}), got {tuple(params.shape)}")
        listed = [images] if isinstance(images, torch.Tensor) else list(images)
        if {t.dtype for t in listed} != {torch.uint8} or sum(len(t) if t.ndim == 4 else 1 for t in listed) != len(params):
            raise ValueError(f"images must be {len(params)} uint8 (3, H, W) images, one per row of params")
        x = _pad_to_batch(images, device).float().div_(255.0)
        cfg, n_glob = self.config, self.num_global
        mean = torch.tensor(cfg.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std, device=x.device).view(1, 3, 1, 1)
        out: list[torch.Tensor] = []
        for first, last, size in ((0, n_glob, cfg.global_crops_size), (n_glob, params.shape[1], cfg.local_crops_size)):
            if last == first:
                continue
            p = params[:, first:last]                                     # (B, K, P) on the CPU
            crops = resized_crops(x, p.to(x.device), size)                # (B, K, 3, S, S)
            flat = augment_crops(crops.flatten(0, 1), p.flatten(0, 1), blur_kernel_size(size))
            flat = (flat - mean) / std
            out += list(flat.view(crops.shape).unbind(1))
        return out

    def __repr__(self) -> str:
        return f"BatchedMultiCrop({self.config})"


class _Rng:
    """torchvision's one-element draws (``torch.empty(1).uniform_``, ``torch.rand(1)``,
    ``torch.randint(.., size=(1,))``) on generator ``g``, into reused buffers: the same numbers, ~2x
    faster."""

    def __init__(self, g: torch.Generator) -> None:
        self.g, self._f, self._i = g, torch.empty(1), torch.empty(1, dtype=torch.long)

    def uniform(self, lo: float, hi: float) -> float:
        return self._f.uniform_(lo, hi, generator=self.g).item()

    def happens(self, p: float) -> float:
        """1.0 with probability ``p``: torchvision's ``torch.rand(1) >= p`` skip test (a float32 compare)."""
        return 0.0 if self._f.uniform_(generator=self.g).item() >= float(np.float32(p)) else 1.0

    def randint(self, high: int) -> int:
        return self._i.random_(0, high, generator=self.g).item()


def _crop_box(height: int, width: int, scale: Sequence[float], r: _Rng) -> list[float]:
    """torchvision v2 RandomResizedCrop.make_params, draw for draw, from generator ``g``."""
    area = height * width
    lo, hi = _LOG_RATIO
    for _ in range(10):
        target_area = area * r.uniform(scale[0], scale[1])
        aspect_ratio = r._f.uniform_(lo, hi, generator=r.g).exp_().item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = r.randint(height - h + 1)
            j = r.randint(width - w + 1)
            return [i, j, h, w]
    in_ratio = float(width) / float(height)        # fallback: central crop
    if in_ratio < min(_RATIO):
        w, h = width, int(round(width / min(_RATIO)))
    elif in_ratio > max(_RATIO):
        h, w = height, int(round(height * max(_RATIO)))
    else:
        w, h = width, height
    return [(height - h) // 2, (width - w) // 2, h, w]


def _pad_to_batch(images: torch.Tensor | Sequence[torch.Tensor], device) -> torch.Tensor:
    """One (B, 3, H_max, W_max) tensor on ``device``; zero padding is never read by a crop."""
    if isinstance(images, torch.Tensor):
        return images.to(device, non_blocking=True)
    h = max(int(t.shape[1]) for t in images)
    w = max(int(t.shape[2]) for t in images)
    out = torch.zeros(len(images), 3, h, w, dtype=torch.uint8, device=device)
    for k, t in enumerate(images):
        out[k, :, :t.shape[1], :t.shape[2]] = t.to(device, non_blocking=True)
    return out

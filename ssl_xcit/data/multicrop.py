"""DINO multi-crop augmentation: one image -> 2 global crops then N local crops.

Output contract (shared by every implementation of :class:`MultiCropTransform`, so that a GPU
augmentation can replace this CPU one later without touching the training loop):

* a ``list`` of ``num_global + num_local`` tensors, **global crops first**, in the order of
  ``crop_sizes``;
* each tensor is ``float32``, shape ``(3, size, size)`` (CHW), normalised with ``mean``/``std``
  (ImageNet by default), on the CPU;
* all randomness is drawn from torch's global RNG, so ``torch.manual_seed(s)`` right before the
  call makes the output a pure function of ``(image, s)``. The data loader seeds each sample this
  way, which makes a resumed run see exactly the augmentations it would have seen.

The recipe follows DINO (facebookresearch/dino): RandomResizedCrop (bicubic), horizontal flip,
colour jitter (0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale p=0.2, Gaussian blur with p=1.0 / 0.1 /
0.5 (global 1 / global 2 / locals, sigma 0.1-2.0 px), solarisation p=0.2 on global 2 only.

Blur kernel: DINO blurs with PIL (radius = sigma, effectively unbounded support); here the
torchvision kernel is 23 px at 224 px crops and scales with the crop size (nearest odd number to
``23 * size / 224``, at least 3 and at most the crop size), so a 96 px local crop gets 9 px and a
32 px crop 3 px. sigma stays in pixels (0.1-2.0) like DINO, so on small crops the kernel
truncates the largest sigmas: the blur is slightly weaker than a full Gaussian, never stronger.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from ssl_xcit.data.common import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 (imported from here too)

REFERENCE_BLUR_KERNEL = 23
REFERENCE_CROP_SIZE = 224


@runtime_checkable
class MultiCropTransform(Protocol):
    """What the data pipeline and the training loop rely on (see the module docstring)."""

    num_global: int
    num_local: int

    @property
    def crop_sizes(self) -> tuple[int, ...]:
        """Side length of every crop, in output order (globals first)."""
        ...

    def __call__(self, image: Any) -> list[torch.Tensor]:
        ...


def _pair(value: Sequence[float], name: str) -> tuple[float, float]:
    value = tuple(float(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"MultiCropConfig.{name} must have 2 values, got {value}")
    return value  # type: ignore[return-value]


def _check_prob(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"MultiCropConfig.{name}={value} is not a probability in [0, 1]")


@dataclass
class MultiCropConfig:
    """Crop sizes, scales and augmentation probabilities (defaults: DINO ViT recipe).

    The fields after ``local_crops_scale`` exist so tests and ablations can switch parts off;
    the defaults are DINO's values.
    """

    global_crops_size: int = 224
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_number: int = 8
    local_crops_size: int = 96
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    flip_prob: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global 1, global 2, locals
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.2  # global 2 only
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        # YAML gives lists; store tuples so configs compare and hash predictably.
        for name in ("global_crops_size", "local_crops_size", "local_crops_number"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"MultiCropConfig.{name} must be an int, got {value!r}")
        if self.global_crops_size < 1 or self.local_crops_size < 1:
            raise ValueError(f"MultiCropConfig crop sizes must be >= 1, got global="
                             f"{self.global_crops_size} local={self.local_crops_size}")
        if self.local_crops_number < 0:
            raise ValueError(f"MultiCropConfig.local_crops_number={self.local_crops_number} < 0")
        for name in ("global_crops_scale", "local_crops_scale"):
            lo, hi = _pair(getattr(self, name), name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"MultiCropConfig.{name}=({lo}, {hi}) must satisfy 0 < min <= max <= 1")
            setattr(self, name, (lo, hi))
        lo, hi = _pair(self.blur_sigma, "blur_sigma")
        if not 0.0 < lo <= hi:
            raise ValueError(f"MultiCropConfig.blur_sigma=({lo}, {hi}) must satisfy 0 < min <= max")
        self.blur_sigma = (lo, hi)
        self.color_jitter = tuple(float(v) for v in self.color_jitter)  # type: ignore[assignment]
        if len(self.color_jitter) != 4 or min(self.color_jitter) < 0 or self.color_jitter[3] > 0.5:
            raise ValueError(f"MultiCropConfig.color_jitter={self.color_jitter} must be 4 values "
                             "(brightness, contrast, saturation, hue) >= 0 with hue <= 0.5")
        self.blur_probs = tuple(float(v) for v in self.blur_probs)  # type: ignore[assignment]
        if len(self.blur_probs) != 3:
            raise ValueError(f"MultiCropConfig.blur_probs={self.blur_probs} must have 3 values "
                             "(global 1, global 2, locals)")
        for i, p in enumerate(self.blur_probs):
            _check_prob(p, f"blur_probs[{i}]")
        for name in ("flip_prob", "color_jitter_prob", "grayscale_prob", "solarize_prob"):
            _check_prob(float(getattr(self, name)), name)
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"MultiCropConfig.{name}={value} must have 3 values (RGB)")
            setattr(self, name, value)
        if min(self.std) <= 0:
            raise ValueError(f"MultiCropConfig.std={self.std} must be > 0")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MultiCropConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MultiCropConfig keys {unknown}; known: {sorted(known)}")
        return cls(**d)


def blur_kernel_size(crop_size: int, reference_kernel: int = REFERENCE_BLUR_KERNEL,
                     reference_size: int = REFERENCE_CROP_SIZE) -> int:
    """Odd kernel size scaled with the crop: 23 at 224 px, at least 3, at most the crop size.

    The upper bound keeps torchvision's reflect padding (kernel // 2) smaller than the image.
    """
    if crop_size < 1:
        raise ValueError(f"crop_size must be >= 1, got {crop_size}")
    k = 2 * round((reference_kernel * crop_size / reference_size - 1) / 2) + 1
    largest = crop_size if crop_size % 2 == 1 else crop_size - 1
    return max(1, min(max(k, 3), largest))


class DinoMultiCrop:
    """Callable: image (PIL, or uint8 CHW tensor) -> list of normalised float crops.

    Work happens on uint8 tensors after the resize, so every op after the crop runs on the small
    crop, not the full image.
    """

    num_global = 2

    def __init__(self, config: MultiCropConfig | None = None) -> None:
        self.config = cfg = config if config is not None else MultiCropConfig()
        self.num_local = cfg.local_crops_number
        b, c, s, h = cfg.color_jitter
        flip_jitter_gray = [
            v2.RandomHorizontalFlip(p=cfg.flip_prob),
            v2.RandomApply([v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)],
                           p=cfg.color_jitter_prob),
            v2.RandomGrayscale(p=cfg.grayscale_prob),
        ]
        normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)]

        def crop(size: int, scale: tuple[float, float]) -> v2.Transform:
            return v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC,
                                        antialias=True)

        def blur(size: int, p: float) -> v2.Transform:
            return v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size), sigma=cfg.blur_sigma)], p=p)

        g, l_ = cfg.global_crops_size, cfg.local_crops_size
        self.global1 = v2.Compose([crop(g, cfg.global_crops_scale), *flip_jitter_gray,
                                   blur(g, cfg.blur_probs[0]), *normalize])
        self.global2 = v2.Compose([crop(g, cfg.global_crops_scale), *flip_jitter_gray,
                                   blur(g, cfg.blur_probs[1]),
                                   v2.RandomSolarize(threshold=128, p=cfg.solarize_prob), *normalize])
        self.local = v2.Compose([crop(l_, cfg.local_crops_scale), *flip_jitter_gray,
                                 blur(l_, cfg.blur_probs[2]), *normalize])

    @property
    def crop_sizes(self) -> tuple[int, ...]:
        cfg = self.config
        return (cfg.global_crops_size,) * 2 + (cfg.local_crops_size,) * cfg.local_crops_number

    @staticmethod
    def _to_uint8_image(image: Any) -> torch.Tensor:
        if isinstance(image, Image.Image):
            if image.mode != "RGB":
                image = image.convert("RGB")
            return v2.functional.to_image(image)
        if isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
                raise ValueError("DinoMultiCrop expects a PIL image or a uint8 RGB tensor of shape "
                                 f"(3, H, W); got {image.dtype} tensor of shape {tuple(image.shape)}")
            return v2.functional.to_image(image)
        raise TypeError(f"DinoMultiCrop expects a PIL image or a uint8 tensor, got {type(image).__name__}")

    def __call__(self, image: Any) -> list[torch.Tensor]:
        img = self._to_uint8_image(image)
        crops = [self.global1(img), self.global2(img)]
        crops += [self.local(img) for _ in range(self.num_local)]
        # plain tensors: tv_tensors.Image subclasses survive default_collate but confuse torch.compile
        return [c.as_subclass(torch.Tensor) for c in crops]

    def __repr__(self) -> str:
        return f"DinoMultiCrop({self.config})"

"""The edits that make copies for a copy-detection benchmark, after Copydays and DISC21.

Copydays (DINO's copy-detection set) edits holiday photos by JPEG quality, crops and "strong"
manual edits (print-scan, painting, combinations); DISC21 (the Image Similarity Challenge)
adds automatic augmentations: rescales, rotations, flips, blur, colour changes, text and emoji
overlays, borders, and chains of them. Here each edit family has three strength levels
(``LEVELS``: 1 weak .. 3 strong); every random choice (crop position, overlay text and place,
colours) comes from the ``numpy.random.Generator`` passed in, so a benchmark seeded once is the
same everywhere.

``apply_edit(image, family, level, rng) -> image`` (PIL RGB in, PIL RGB out). The JPEG family
returns the decoded JPEG; copies are saved losslessly-enough by the caller (quality 95).
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from ssl_xcit.errors import UserError

LEVELS = (1, 2, 3)
CROP_KEEP = {1: 0.7, 2: 0.45, 3: 0.25}           # share of the area kept
RESCALE = {1: 0.5, 2: 0.25, 3: 0.125}             # side factor (then stored at that size)
ROTATE = {1: 10, 2: 30, 3: 90}                    # degrees (sign drawn)
JPEG_QUALITY = {1: 50, 2: 15, 3: 5}
BLUR_RADIUS = {1: 1.0, 2: 3.0, 3: 6.0}            # relative to a 256-px image
COLOUR = {1: 0.3, 2: 0.6, 3: 1.0}                 # jitter strength; level 3 may also grey or invert
OVERLAY_COVER = {1: 0.1, 2: 0.25, 3: 0.45}        # share of the height covered by text / emoji
BORDER = {1: 0.1, 2: 0.25, 3: 0.5}                # border width relative to the side


class EditError(UserError, ValueError):
    """An unknown edit family or level."""


def _crop(im: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    keep = CROP_KEEP[level]
    aspect = rng.uniform(0.75, 1.33)
    w = int(round(im.width * min(1.0, np.sqrt(keep * aspect))))
    h = int(round(im.height * min(1.0, keep / max(w / im.width, 1e-6))))
    x, y = rng.integers(0, im.width - w + 1), rng.integers(0, im.height - h + 1)
    return im.crop((int(x), int(y), int(x) + max(w, 8), int(y) + max(h, 8)))


def _rescale(im: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    f = RESCALE[level]
    return im.resize((max(8, round(im.width * f)), max(8, round(im.height * f))), Image.BILINEAR)


def _rotate(im: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    angle = ROTATE[level] * (1 if rng.random() < 0.5 else -1)
    return im.rotate(angle, resample=Image.BICUBIC, expand=True, fillcolor=(0, 0, 0))


def _flip(im: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    """Level 1 mirrors, 2 flips upside down, 3 does both."""
    if level in (1, 3):
        im = ImageOps.mirror(im)
    return ImageOps.flip(im) if level >= 2 else im


def _jpeg(im: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=JPEG_QUALITY[level])
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _blur(im: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    return im.filter(ImageFilter.GaussianBlur(BLUR_RADIUS[level] * max(im.size) / 256))


def _colour(im: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    s = COLOUR[level]
    for enh in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        im = enh(im).enhance(float(np.exp(rng.uniform(-s, s))))
    hue = int(rng.uniform(-s, s) * 60)
    if hue:
        h, sat, v = im.convert("HSV").split()
        h = h.point(lambda p: (p + hue) % 256)
        im = Image.merge("HSV", (h, sat, v)).convert("RGB")
    if level == 3 and rng.random() < 0.5:
        im = ImageOps.grayscale(im).convert("RGB") if rng.random() < 0.5 else ImageOps.invert(im)
    return im


def _overlay(im: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    """Lines of random text, and an "emoji" (a filled disc with eyes and a mouth), over a band
    covering ``OVERLAY_COVER`` of the height."""
    im = im.copy()
    draw = ImageDraw.Draw(im)
    band = int(im.height * OVERLAY_COVER[level])
    y0 = int(rng.integers(0, max(1, im.height - band)))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 !?#@"))
    size = max(8, band // 3)
    for line in range(3):
        text = "".join(rng.choice(letters, 24))
        draw.text((int(rng.integers(0, max(1, im.width // 4))), y0 + line * band // 3), text, fill=colour,
                  font_size=size)
    r = max(4, band // 2)
    cx, cy = int(rng.integers(r, max(r + 1, im.width - r))), y0 + band // 2
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(255, 204, 0), outline=(0, 0, 0))
    for dx in (-r // 3, r // 3):
        draw.ellipse((cx + dx - r // 8, cy - r // 3 - r // 8, cx + dx + r // 8, cy - r // 3 + r // 8), fill=(0, 0, 0))
    draw.arc((cx - r // 2, cy - r // 4, cx + r // 2, cy + r // 2), 20, 160, fill=(0, 0, 0), width=max(1, r // 10))
    return im


def _border(im: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    pad = int(round(BORDER[level] * max(im.size) / 2))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    return ImageOps.expand(im, border=pad, fill=colour)


def _combined(im: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    """A chain like DISC21's and Copydays' "strong": crop, colour, overlay, JPEG (+ border, rotation
    at the stronger levels), each at this level."""
    im = _crop(im, level, rng)
    im = _colour(im, min(level, 2), rng)
    im = _overlay(im, level, rng)
    if level >= 2:
        im = _border(im, 1, rng)
    if level == 3:
        im = _rotate(im, 1, rng)
    return _jpeg(im, level, rng)


FAMILIES = {"crop": _crop, "rescale": _rescale, "rotate": _rotate, "flip": _flip, "jpeg": _jpeg, "blur": _blur,
            "colour": _colour, "overlay": _overlay, "border": _border, "combined": _combined}


def apply_edit(image: Image.Image, family: str, level: int, rng: np.random.Generator) -> Image.Image:
    """``image`` edited by ``family`` at strength ``level`` (1-3), random choices from ``rng``."""
    if family not in FAMILIES:
        raise EditError(f"unknown edit family {family!r}; choose from {', '.join(FAMILIES)}")
    if level not in LEVELS:
        raise EditError(f"edit level must be one of {LEVELS}, got {level}")
    return FAMILIES[family](image.convert("RGB"), level, rng).convert("RGB")

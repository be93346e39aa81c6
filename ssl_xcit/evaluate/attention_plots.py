"""Pictures of :class:`~ssl_xcit.evaluate.attention.AttentionMaps`: PNG heat maps, the thresholded
mask over the image, one grid figure per image, and the maps of several checkpoints side by side.

Heat maps are coloured per map from its minimum (dark) to its maximum (bright), matplotlib's
``inferno``, as DINO's ``plt.imsave`` does: a nearly uniform map still shows its structure, so read
the spread from the arrays, not the colours. Maps are upsampled to the image by repeating each patch value over its pixels, so a patch stays a
visible square. Small images (CIFAR's 32 px) are enlarged by an integer factor so a PNG is at
least ``min_side`` pixels; nothing is smoothed. Uses matplotlib's Agg backend (no display).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ssl_xcit.evaluate.attention import AttentionMaps
from ssl_xcit.evaluate.figures import pyplot, save_figure

MIN_SIDE = 224
CMAP = "inferno"


def heatmap_rgb(maps: AttentionMaps, grid_map: np.ndarray) -> np.ndarray:
    """A (Hp, Wp) map coloured (its min to its max) and upsampled to the image: uint8 (H, W, 3)."""
    from matplotlib import colormaps
    g = np.asarray(grid_map, dtype=np.float64)
    span = g.max() - g.min()
    g = (g - g.min()) / span if span > 0 else np.zeros_like(g)
    rgba = colormaps[CMAP](maps.upsample(g))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def mask_overlay(maps: AttentionMaps, mask: np.ndarray) -> np.ndarray:
    """The image with everything outside ``mask`` (Hp, Wp) dimmed and the mask's outline in yellow."""
    if maps.image is None:
        raise ValueError("these AttentionMaps carry no image to draw on")
    m = maps.upsample(mask.astype(bool))
    out = maps.image.astype(np.float32)
    out[~m] *= 0.3
    pad = np.pad(m, 1, constant_values=False)
    inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    out[m & ~inner] = (255, 230, 0)
    return out.round().astype(np.uint8)


def enlarge(picture: np.ndarray, min_side: int = MIN_SIDE) -> np.ndarray:
    """Repeat pixels by the smallest integer factor that makes the shorter side >= ``min_side``."""
    f = max(1, math.ceil(min_side / min(picture.shape[:2])))
    return np.repeat(np.repeat(picture, f, axis=0), f, axis=1) if f > 1 else picture


def save_png(picture: np.ndarray, path: str | Path, min_side: int = MIN_SIDE) -> Path:
    from PIL import Image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(enlarge(picture, min_side)).save(path)
    return path


def _peak(grid_map: np.ndarray) -> float:
    """The largest patch's attention as a multiple of a uniform map's (1.0 = flat)."""
    return float(np.max(grid_map) * np.size(grid_map))


def grid_figure(maps: AttentionMaps, path: str | Path, title: str = "", ncols: int = 4) -> Path:
    """One picture with the image, the mean map, the mean's mask over the image and every head.

    Titles give each map's peak (largest patch share x number of patches: 1.0 is a flat map) and
    the share of attention the CLS kept on itself."""
    plt = pyplot()
    panels: list[tuple[str, np.ndarray]] = []
    if maps.image is not None:
        panels.append(("image", maps.image))
    panels.append((f"mean of heads, peak {_peak(maps.mean):.2f}x", heatmap_rgb(maps, maps.mean)))
    if maps.image is not None:
        panels.append((f"mean: {maps.threshold:.0%} mask", mask_overlay(maps, maps.mean_mask)))
    for i, h in enumerate(maps.heads):
        panels.append((f"head {i}, peak {_peak(h):.2f}x, CLS {maps.cls_self[i]:.2f}", heatmap_rgb(maps, h)))
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    aspect = maps.heads.shape[1] / maps.heads.shape[2]
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.6 * aspect * nrows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, pic) in zip(axes.flat, panels):
        ax.imshow(pic, interpolation="nearest")
        ax.set_title(name, fontsize=9)
    hp, wp = maps.grid
    fig.suptitle(f"{title}  class-attention layer {maps.layer}, {hp}x{wp} patches of {maps.patch_size} px"
                 .strip(), fontsize=10)
    return save_figure(fig, path, dpi=100)


def write_image_maps(maps: AttentionMaps, out_dir: str | Path, title: str = "") -> dict[str, Path]:
    """Every picture of one image into ``out_dir``: ``head00.png`` ..., ``mean.png``, ``mask.png``
    (the mean's thresholded mask over the image), ``head00_mask.png`` ... and ``grid.png``."""
    out_dir = Path(out_dir)
    files = {}
    for i, h in enumerate(maps.heads):
        files[f"head{i:02d}"] = save_png(heatmap_rgb(maps, h), out_dir / f"head{i:02d}.png")
    files["mean"] = save_png(heatmap_rgb(maps, maps.mean), out_dir / "mean.png")
    if maps.image is not None:
        files["mask"] = save_png(mask_overlay(maps, maps.mean_mask), out_dir / "mask.png")
        for i, m in enumerate(maps.head_masks):
            files[f"head{i:02d}_mask"] = save_png(mask_overlay(maps, m), out_dir / f"head{i:02d}_mask.png")
    files["grid"] = grid_figure(maps, out_dir / "grid.png", title)
    return files


def evolution_figure(rows: Sequence[tuple[str, Sequence[AttentionMaps]]], path: str | Path,
                     network: str = "teacher") -> Path:
    """Checkpoints (rows, oldest first) x images (columns): the image, then each checkpoint's mean
    map blended over it, so the maps can be seen to sharpen as training goes; each cell names the
    map's peak (1.0x is flat), as the colours span each map's own range. ``network``: whose maps
    (a DINO run's teacher, a fine-tuning run's model: a classifier has no teacher)."""
    plt = pyplot()
    if not rows or not rows[0][1]:
        raise ValueError("evolution_figure needs at least one checkpoint with one image")
    first = rows[0][1]
    ncols, nrows = len(first), len(rows) + 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.7 * ncols + 1.2, 1.7 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for j, m in enumerate(first):
        axes[0, j].imshow(m.image if m.image is not None else np.zeros((*m.grid, 3)), interpolation="nearest")
    axes[0, 0].set_ylabel("image", fontsize=8)
    for i, (label, maps_row) in enumerate(rows, start=1):
        for j, m in enumerate(maps_row):
            heat = heatmap_rgb(m, m.mean).astype(np.float32)
            pic = heat if m.image is None else 0.35 * m.image.astype(np.float32) + 0.65 * heat
            axes[i, j].imshow(pic.round().astype(np.uint8), interpolation="nearest")
            axes[i, j].text(0.03, 0.04, f"{_peak(m.mean):.2f}x", transform=axes[i, j].transAxes, fontsize=7,
                            color="white", bbox=dict(facecolor="black", alpha=0.5, pad=1, lw=0))
        axes[i, 0].set_ylabel(label, fontsize=8)
    fig.suptitle(f"{network}'s mean class-attention map per checkpoint (each map its own colour range; "
                 "corner: peak as a multiple of a flat map)", fontsize=8)
    return save_figure(fig, path, dpi=100)


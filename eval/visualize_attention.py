#!/usr/bin/env python
"""XCiT self-attention maps of images, DINO's ``visualize_attention.py`` for XCiT.

    python eval/visualize_attention.py --checkpoint runs/s12/checkpoint.pth --images photos/ --out maps/

Per image, in ``OUT/<image name>/``: ``head00.png`` ... (each head's CLS->patch attention of the last
class-attention layer, upsampled to the image), ``mean.png`` (mean over heads), ``mask.png`` (DINO's
thresholded mask of the mean over the image; ``headNN_mask.png`` per head), ``grid.png`` (all of
them in one picture) and ``attention.npz`` (the arrays). The arrays come from
``ssl_xcit.evaluate.attention``; this file only parses the command line (torch loads after it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ssl_xcit import cli  # noqa: E402  (torch-free)
from ssl_xcit.errors import UserError  # noqa: E402

PROG = "visualize_attention.py"
# Without --image-size an image keeps its size up to this many pixels on its longer side: a photo of
# 10000 x 10000 px is 1.56M patch tokens at patch 8, which ran until memory ran out.
DEFAULT_MAX_SIDE = 1024
# this command's words for a setting a library error names by its role (ssl_xcit.cli.reword)
HINTS = {"arch": "pass --arch NAME (a zoo architecture, e.g. xcit_small_12_p16)"}


def build_parser() -> argparse.ArgumentParser:
    # a usage mistake is one line (cli.UsageError), each default is said once
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="any checkpoint ssl_xcit.load_backbone reads (training checkpoint, DINO, official "
                        "XCiT, timm, mmpretrain), or a model name for a random-init backbone")
    p.add_argument("--images", required=True, help="an image file, or a folder searched recursively")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per image)")
    p.add_argument("--arch", default=None, help="architecture, when the checkpoint does not name it")
    p.add_argument("--checkpoint-key", default="teacher", choices=("teacher", "student"),
                   help="which network of a DINO training checkpoint")
    p.add_argument("--layer", type=int, default=-1,
                   help="class-attention layer (0 = first, -1 = last; published XCiTs have 2)")
    p.add_argument("--threshold", type=float, default=0.6,
                   help="mask: the smallest set of patches holding this share of the attention")
    p.add_argument("--image-size", type=int, nargs="+", default=None, metavar="N",
                   help="N: shorter side resized to N; H W: resized to H x W; default: the file's size, "
                        f"scaled down to at most {DEFAULT_MAX_SIDE} px on its longer side. Then centre-cropped "
                        "to multiples of the patch size")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of a random-init backbone (model name)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="in a folder, skip unreadable images (with a warning) instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_args(args: argparse.Namespace) -> None:
    if not 0.0 < args.threshold <= 1.0:
        raise UserError(f"--threshold must be in (0, 1], got {args.threshold}")
    if args.image_size is not None and (len(args.image_size) > 2 or min(args.image_size) <= 0):
        raise UserError(f"--image-size takes one positive size N or two (H W), got {args.image_size}")


def list_images(where: str | Path) -> list[Path]:
    """The image file itself, or every image file below a folder (sorted)."""
    from ssl_xcit.data.folders import IMAGE_EXTENSIONS
    where = Path(where)
    if where.is_file():
        return [where]
    if not where.exists():
        raise FileNotFoundError(2, "No such file or directory", str(where))
    files = sorted(f for f in where.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserError(f"{where}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    return files


def default_size(path: Path) -> tuple[int, int] | None:
    """Without --image-size: ``None`` (the file's size) up to :data:`DEFAULT_MAX_SIDE` px a side, else
    the (H, W) that brings its longer side to that, with a warning naming --image-size. The size is read
    from the header; an unreadable file is left to the reader, which names it."""
    from ssl_xcit.data.common import DECODE_ERRORS, read_size
    try:
        w, h = read_size(path)
    except DECODE_ERRORS:
        return None
    if max(w, h) <= DEFAULT_MAX_SIDE:
        return None
    scale = DEFAULT_MAX_SIDE / max(w, h)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    print(f"{PROG}: warning: {path.name} is {w}x{h} px; resized to {size[1]}x{size[0]} (by default at most "
          f"{DEFAULT_MAX_SIDE} px a side; --image-size N or --image-size H W sets the size)", file=sys.stderr)
    return size


def output_name(image: Path, base: Path) -> str:
    """``cat.jpg`` -> ``cat``; below a folder, ``dogs/a.jpg`` -> ``dogs__a`` (names stay unique)."""
    rel = image.relative_to(base) if base.is_dir() else Path(image.name)
    return "__".join(rel.with_suffix("").parts)


def main(argv: list[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    check_args(args)
    images = list_images(args.images)

    import numpy as np
    from tqdm import tqdm

    from ssl_xcit.distributed import pick_device
    from ssl_xcit.evaluate.attention import ImageReadError, attention_maps, load_image, resolve_layer
    from ssl_xcit.evaluate.attention_plots import write_image_maps
    from ssl_xcit.evaluate.backbone import load_frozen_backbone

    try:
        device = pick_device(args.device)
    except (ValueError, RuntimeError) as err:
        raise UserError(f"--device: {err}") from None
    try:
        model = load_frozen_backbone(args.checkpoint, args.arch, args.checkpoint_key, device, seed=args.seed)
    except (ValueError, TypeError) as err:
        if isinstance(err, UserError):
            raise cli.own_words(err, HINTS)
        raise UserError(f"--checkpoint {args.checkpoint}: {err}") from None
    try:
        layer = resolve_layer(model, args.layer)
    except (ValueError, TypeError) as err:   # a layer the model does not have, or a model without any
        raise UserError(f"--layer {args.layer}: {err}") from None
    cfg = model.data_config
    size = None if args.image_size is None else (
        args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size))
    out, base, written = Path(args.out), Path(args.images), []
    for path in tqdm(images, desc="attention maps", unit="image", disable=args.no_progress or len(images) < 2):
        try:
            tensor, picture = load_image(path, size if size is not None else default_size(path), model.patch_size,
                                         cfg["mean"], cfg["std"])
        except ImageReadError as err:
            if not args.skip_unreadable or len(images) == 1:
                raise
            print(f"{PROG}: warning: skipped {err}", file=sys.stderr)
            continue
        maps = attention_maps(model, tensor[None].to(device), layer, args.threshold, [picture])[0]
        folder = out / output_name(path, base)
        write_image_maps(maps, folder, title=path.name)
        np.savez_compressed(folder / "attention.npz", heads=maps.heads, mean=maps.mean, cls_self=maps.cls_self,
                            head_masks=maps.head_masks, mean_mask=maps.mean_mask, image=picture)
        written.append(folder)
    print(f"attention maps of {len(written)} image(s) written to {out}")
    return written


if __name__ == "__main__":
    cli.run(main, prog=PROG, hints=HINTS)

"""The report page's attention section: the teacher's mean class-attention map of a few fixed images
for the run's random start and each saved checkpoint, one figure (rows: checkpoints, oldest first).

Images are the k-NN monitor's val/ split when the run has one, else its training images (folders or
archives resolved as the run resolved them), evenly spread and the same for every checkpoint. They
are resized to the run's ``global_crops_size`` (shorter side), the resolution the teacher trained at.
"""
from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Sequence

from ssl_xcit.data.subsets import evenly_spread
from ssl_xcit.errors import UserError
from ssl_xcit.evaluate.report_plots import figure_html

CKPT_RE = re.compile(r"checkpoint(\d{4})\.pth$")


def find_checkpoints(output_dir: str | Path, limit: int = 8) -> list[Path]:
    """``checkpointNNNN.pth`` by epoch, then ``checkpoint.pth``; at most ``limit``, evenly spread,
    always keeping the first and the last."""
    output_dir = Path(output_dir)
    kept = sorted((p for p in output_dir.glob("checkpoint*.pth") if CKPT_RE.search(p.name)),
                  key=lambda p: int(CKPT_RE.search(p.name).group(1)))
    if (output_dir / "checkpoint.pth").is_file():
        kept.append(output_dir / "checkpoint.pth")
    if len(kept) > limit:
        kept = [kept[i] for i in evenly_spread(len(kept), limit)]
    return kept


def _read_evenly(dataset, n: int) -> tuple[list, list[str]]:
    """``n`` images of ``dataset`` (evenly spread) read by the data layer's own reading, which returns
    ``None`` for an unreadable file (and warns once): ``(pictures, locations of the unreadable ones)``."""
    pictures, skipped = [], []
    for i in evenly_spread(len(dataset), n).tolist():
        item = dataset[i]
        if item is None:
            skipped.append(dataset.location(i))
        else:
            pictures.append(item[0])
    return pictures, skipped


def pick_images(config: dict, n: int) -> tuple[list, list[str], str]:
    """``n`` fixed images (decoded RGB), evenly spread: the k-NN monitor's val/ split when configured,
    else the training images (folders, archives or shards, as the run read them). Unreadable ones are
    skipped, as training skips them. ``(pictures, unreadable ones, why there are none)``."""
    from ssl_xcit.data.sources import open_image_dataset, resolve_data_path
    why = "the run's config names no data_path"
    eval_path = (config.get("eval") or {}).get("eval_data_path")
    data_path = (config.get("data") or {}).get("data_path")
    for path, subs in ((eval_path, ("val",)), (data_path, ("train", ""))):
        if not path:
            continue
        try:
            root = resolve_data_path(path, progress=False)
        except (UserError, OSError) as err:
            why = f"{path} is not readable from here ({err})"
            continue
        for sub in subs:
            folder = Path(root) / sub
            try:
                dataset = open_image_dataset(folder, progress=False) if folder.is_dir() else None
            except (UserError, OSError):   # no images there
                dataset = None
            if dataset is not None and len(dataset):
                pictures, skipped = _read_evenly(dataset, n)
                return pictures, skipped, "" if pictures else f"the {len(skipped)} images picked from {folder} " \
                                                             "are unreadable"
        why = f"no images found in {path}"
    return [], [], why


def read_pictures(paths: Sequence[Path]) -> tuple[list, list[str]]:
    """The images named on the command line, decoded by the data layer's reader; unreadable ones are
    skipped: ``(pictures, unreadable paths)``."""
    from ssl_xcit.evaluate.attention import ImageReadError, read_picture
    pictures, skipped = [], []
    for path in paths:
        try:
            pictures.append(read_picture(path))
        except (ImageReadError, OSError):
            skipped.append(str(path))
    return pictures, skipped


def attention_evolution(checkpoints: Sequence[Path], pictures: Sequence, image_size: int | None,
                        out_path: Path, start: tuple[str, int] | None = None, network: str = "teacher"
                        ) -> tuple[Path | None, list[str], list[str]]:
    """The teacher's mean map of ``pictures`` (decoded RGB images) for each checkpoint, one row per
    distinct global step.

    ``start=(arch, seed)`` adds a first row for the random network the run started from (the
    training seed draws it again exactly, see :func:`ssl_xcit.evaluate.backbone.load_frozen_backbone`);
    ``start=(arch, path)`` one for the pretrained weights it started from.
    Returns ``(figure or None, row labels, unreadable checkpoints with the reason)``.
    """
    import torch
    from ssl_xcit.evaluate.attention import attention_maps
    from ssl_xcit.evaluate.attention_plots import evolution_figure
    from ssl_xcit.evaluate.backbone import load_frozen_backbone
    from ssl_xcit.models import load_backbone
    from ssl_xcit.models.checkpoints import read_checkpoint
    skipped: list[str] = []
    sources: list = []
    if start is not None and isinstance(start[1], int):
        sources.append(("step 0\n(random init)", lambda: load_frozen_backbone(start[0], seed=start[1]), 0))
    elif start is not None:
        sources.append(("step 0\n(pretrained_weights)", lambda: load_frozen_backbone(start[1]), 0))
    for ckpt in checkpoints:
        try:
            state = read_checkpoint(ckpt)
        except (UserError, OSError) as err:
            skipped.append(f"{ckpt.name}: {getattr(err, 'problem', None) or err}")   # no Python-argument hint
            continue
        step = state.get("global_step") if isinstance(state, dict) else None
        label = f"step {step}\n({ckpt.stem})" if step is not None else ckpt.stem
        sources.append((label, lambda state=state: load_backbone(state, checkpoint_key="teacher"), step))
    rows, labels, seen, loaded = [], [], set(), None
    for label, load, step in sources:
        if step is not None and step in seen:
            continue  # checkpoint.pth is usually a copy of the last checkpointNNNN.pth
        seen.add(step)
        model = load().eval()
        if loaded is None:   # the same arch in every row: the pictures are prepared once
            loaded = _prepared(pictures, image_size, model)
        with torch.no_grad():
            maps = [attention_maps(model, t[None], pictures=[pic])[0] for t, pic in loaded]
        rows.append((label, maps))
        labels.append(label.replace("\n", " "))
    return (evolution_figure(rows, out_path, network) if rows and loaded else None), labels, skipped


def _prepared(pictures: Sequence, image_size: int | None, model) -> list:
    """``(tensor, picture)`` of each picture at the model's patch size; one smaller than a patch is left out."""
    from ssl_xcit.evaluate.attention import ImageReadError, prepare_image
    out = []
    for pic in pictures:
        try:
            out.append(prepare_image(pic, image_size, model.patch_size, model.data_config["mean"],
                                     model.data_config["std"]))
        except ImageReadError:
            continue
    return out


def _start(config: dict) -> tuple[str, int | str] | None:
    """What the run started from: ``(arch, seed)`` of its random network, ``(arch, file)`` of the
    pretrained weights when they are still there, ``None`` when neither can be shown."""
    model, seed = config.get("model") or {}, (config.get("run") or {}).get("seed")
    arch, weights = model.get("arch"), model.get("pretrained_weights")
    if weights:
        return (arch, weights) if Path(weights).is_file() else None
    return (arch, int(seed)) if arch and isinstance(seed, int) else None


def attention_section(output_dir: Path, out: Path, config: dict, images: Sequence[Path] | None,
                      n_images: int, max_checkpoints: int) -> str:
    """The section's HTML (writing ``attention.png`` into ``out``), or a note saying what is missing."""
    checkpoints = find_checkpoints(output_dir, max_checkpoints)
    if not checkpoints:
        return "<p class=note>no checkpoint saved yet</p>"
    if images:
        pictures, unreadable = read_pictures(list(images))
        why = f"the {len(unreadable)} images given are unreadable"
    else:
        pictures, unreadable, why = pick_images(config, n_images)
    skipped_note = (f"<p class=note>{len(unreadable)} unreadable image(s) skipped: "
                    f"{html.escape(', '.join(unreadable[:5]))}{' ...' if len(unreadable) > 5 else ''}</p>"
                    if unreadable else "")
    if not pictures:
        return (f"<p class=note>no images to show: {html.escape(why)} "
                "(choose them with the images option of eval/report.py)</p>"
                + skipped_note)
    data = config.get("data") or {}
    size = data.get("global_crops_size") or data.get("input_size")   # DINO's crops, a fine-tuning run's input
    start = _start(config)
    network = "model" if "mixup" in config else "teacher"   # a fine-tuning run's config has a mixup section
    path, labels, skipped = attention_evolution(checkpoints, pictures, size, out / "attention.png", start, network)
    notes = skipped_note + "".join(f"<p class=note>unreadable checkpoint skipped: {html.escape(s)}</p>"
                                   for s in skipped)
    if path is None:
        return notes
    caption = (f"mean over heads of the last class-attention layer; rows: {', '.join(labels)}"
               + (f"; images resized to {size} px (shorter side)" if size else ""))
    return figure_html(path, caption) + notes

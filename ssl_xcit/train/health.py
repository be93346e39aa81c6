"""The training run's health checks, apart from the loop that calls them: images that do not load,
a diverging loss, a collapsed teacher. Each reads numbers the loop already has and warns (once, where
the caller says so) or builds the message of the error the loop raises; none changes the training.
"""
from __future__ import annotations

import math
import warnings
from typing import Protocol

from ssl_xcit.data.subsets import evenly_spread
from ssl_xcit.train.logger import RunLogger

# warn once when at least this fraction of the images tried failed to load
UNREADABLE_WARN_FRACTION = 0.5
# a loss above this many times ln(out_dim) is divergence, not learning (healthy: near or below 1x)
DIVERGED_LOSS_FACTOR = 3.0


class ImageDataset(Protocol):
    """What the checks need of the training images (ImageFiles, ShardImages): where image ``i`` is,
    and loading it again (decode or raise)."""
    root: object

    def __len__(self) -> int: ...
    def location(self, i: int) -> str: ...
    def load(self, i: int) -> object: ...


def unreadable_reasons(dataset: ImageDataset, limit: int = 200) -> tuple[int, str]:
    """Load up to ``limit`` of the images (evenly spread; files or shard members) again and count why those that fail do:
    (number checked, ``"20 x cannot identify image file, 3 x image file is truncated"``)."""
    indices = evenly_spread(len(dataset), limit)
    reasons: dict[str, int] = {}
    for i in dict.fromkeys(indices.tolist()):
        where = dataset.location(i)
        try:
            dataset.load(i)
        except Exception as err:  # noqa: BLE001 - any failure is a reason to report
            text = str(err).replace(repr(where), "").replace(where, "").strip(" :'\"") or type(err).__name__
            reasons[text] = reasons.get(text, 0) + 1
    ranked = sorted(reasons.items(), key=lambda kv: -kv[1])
    summary = ", ".join(f"{n} x {text}" for text, n in ranked[:3])
    if len(ranked) > 3:
        summary += f", {sum(n for _, n in ranked[3:])} x other reasons"
    return len(dict.fromkeys(indices.tolist())), summary


def unreadable_message(dataset: ImageDataset, loaded: int, skipped: int, extra: str = "") -> str:
    """The error when nothing (or nothing for many steps) loaded: how many failed, of what, and why."""
    checked, reasons = unreadable_reasons(dataset)
    where = dataset.root
    tried = loaded + skipped
    if loaded == 0:
        what = (f"all {tried} images of {where}" if tried == len(dataset)
                else f"all {tried} images tried of the {len(dataset)} in {where}")
    else:
        what = f"{skipped} of {tried} images tried of {where}"
    because = f"{reasons}" if checked >= len(dataset) else f"{checked} of them checked again: {reasons}"
    extra = f"; {extra}" if extra else ""
    return f"{what} failed to load ({because or 'no failure on a second look'}){extra}: nothing to train on"


def warn_if_mostly_unreadable(dataset: ImageDataset, loaded: int, skipped: int, min_tried: int,
                              logger: RunLogger, is_main: bool, step: int) -> bool:
    """Warn when most images fail to load: the run trains on what is left, which may not be what the
    user thinks (a missing codec, a folder of something else). True when it warned (the caller warns once)."""
    tried = loaded + skipped
    if not is_main or tried < min_tried or skipped < UNREADABLE_WARN_FRACTION * tried:
        return False
    checked, reasons = unreadable_reasons(dataset)
    msg = (f"{skipped} of {tried} images tried failed to load ({checked} of {dataset.root} checked again: "
           f"{reasons}); training on the rest. Fix or remove the unreadable files")
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    print(f"[ssl_xcit] warning: {msg}", flush=True)
    logger.event("unreadable_images_warning", global_step=step, tried=tried, skipped=skipped, reasons=reasons)
    return True


def warn_if_collapsed(values: dict, out_dim: int, step: int, logger: RunLogger, is_main: bool) -> None:
    """DINO collapses two ways: a uniform teacher (entropy at ln K, loss near ln K) or one
    dominant prototype (teacher KL from uniform near ln K). Either shows here before k-NN does."""
    if not is_main or step < 50:
        return
    ln_k = math.log(out_dim)
    uniform = values["teacher_entropy"] > 0.98 * ln_k and abs(values["loss"] - ln_k) < 0.02 * ln_k
    one_hot = values["teacher_kl_uniform"] > 0.98 * ln_k
    if uniform or one_hot:
        kind = "uniform teacher output" if uniform else "one prototype dominates the teacher output"
        msg = (f"run looks collapsed at global step {step}: {kind} (loss {values['loss']:.3f}, "
               f"entropy {values['teacher_entropy']:.3f}, ln(out_dim) {ln_k:.3f})")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        logger.event("collapse_warning", global_step=step, kind=kind)


def warn_if_diverging(values: dict, out_dim: int, step: int, logger: RunLogger, is_main: bool,
                      lr: float) -> bool:
    """DINO's loss is a cross-entropy over ``out_dim`` prototypes: it starts near ln(out_dim) and a
    healthy run stays near or below it. Far above it, the student's logits are blowing up: the run
    diverges (usually too high a learning rate). True when it warned (the caller warns once)."""
    ln_k = math.log(out_dim)
    if not is_main or values["loss"] <= DIVERGED_LOSS_FACTOR * ln_k:
        return False
    msg = (f"run is diverging at global step {step}: loss {values['loss']:.2e} is "
           f"{values['loss'] / ln_k:.0f}x ln(out_dim) {ln_k:.2f} (a healthy DINO loss stays near or below it). "
           f"Likely cause: the learning rate is too high for this batch (lr={lr:g} per 256 images): "
           "lower lr, raise warmup_epochs, or set clip_grad (DINO: 3.0)")
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
    print(f"[ssl_xcit] warning: {msg}", flush=True)
    logger.event("divergence_warning", global_step=step, loss=values["loss"], ln_out_dim=ln_k)
    return True

"""Images that do not load, as a run sees them: the error when nothing (or nothing for many steps)
loaded, and a warning when most fail. Each reads counts the run already has; none changes the
training. Used by :class:`ssl_xcit.engine.run.Run` for every loop.
"""
from __future__ import annotations

import warnings
from typing import Protocol

from ssl_xcit.data.subsets import evenly_spread
from ssl_xcit.engine.logger import RunLogger

# warn once when at least this fraction of the images tried failed to load
UNREADABLE_WARN_FRACTION = 0.5


class ImageDataset(Protocol):
    """What the checks need of the training images (ImageFiles, ShardImages): where image ``i`` is,
    and loading it again (decode or raise)."""
    root: object

    def __len__(self) -> int: ...
    def location(self, i: int) -> str: ...
    def load(self, i: int) -> object: ...


def unreadable_reasons(dataset: ImageDataset, limit: int = 200) -> tuple[int, str]:
    """Load up to ``limit`` of the images (evenly spread; files or shard members) again and count why those that fail do:
    (number checked, ``"20 x cannot identify image file, 3 x image file is truncated, 2 read fine now"``). The
    tallies add up to the number checked: the images that load on this second look are counted too."""
    indices = evenly_spread(len(dataset), limit)
    reasons: dict[str, int] = {}
    loaded = 0
    for i in dict.fromkeys(indices.tolist()):
        where = dataset.location(i)
        try:
            dataset.load(i)
            loaded += 1
        except Exception as err:  # noqa: BLE001 - any failure is a reason to report
            text = str(err).replace(repr(where), "").replace(where, "").strip(" :'\"") or type(err).__name__
            reasons[text] = reasons.get(text, 0) + 1
    ranked = sorted(reasons.items(), key=lambda kv: -kv[1])
    summary = ", ".join(f"{n} x {text}" for text, n in ranked[:3])
    if len(ranked) > 3:
        summary += f", {sum(n for _, n in ranked[3:])} x other reasons"
    if loaded:
        summary += f"{', ' if summary else ''}{loaded} read fine now"
    return len(dict.fromkeys(indices.tolist())), summary


def _checked_again(checked: int, total: int) -> str:
    """``all 11 checked again`` or ``200 of the 1000 checked again``: what the tallies that follow add up to."""
    return f"all {checked} checked again" if checked >= total else f"{checked} of the {total} checked again"


def unreadable_message(dataset: ImageDataset, loaded: int, skipped: int, extra: str = "") -> str:
    """The error when nothing (or nothing for many steps) loaded: how many failed, of what, and why.

    The images the run tried and the images checked again are different sets (the first batches, and up
    to 200 spread over the data set): the message says which count each tally belongs to."""
    checked, reasons = unreadable_reasons(dataset)
    where = dataset.root
    tried = loaded + skipped
    if loaded == 0:
        what = (f"all {tried} images of {where}" if tried == len(dataset)
                else f"all {tried} images tried of the {len(dataset)} in {where}")
    else:
        what = f"{skipped} of {tried} images tried of {where}"
    same_images = loaded == 0 and tried == len(dataset) == checked
    because = reasons if same_images else f"{_checked_again(checked, len(dataset))}: {reasons}"
    extra = f"; {extra}" if extra else ""
    return f"{what} failed to load ({because}){extra}: nothing to train on"


def warn_if_mostly_unreadable(dataset: ImageDataset, loaded: int, skipped: int, min_tried: int,
                              logger: RunLogger, is_main: bool, step: int) -> bool:
    """Warn when most images fail to load: the run trains on what is left, which may not be what the
    user thinks (a missing codec, a folder of something else). True when it warned (the caller warns once)."""
    tried = loaded + skipped
    if not is_main or tried < min_tried or skipped < UNREADABLE_WARN_FRACTION * tried:
        return False
    checked, reasons = unreadable_reasons(dataset)
    msg = (f"{skipped} of {tried} images tried failed to load ({_checked_again(checked, len(dataset))} in "
           f"{dataset.root}: {reasons}); training on the rest. Fix or remove the unreadable files")
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    print(f"[ssl_xcit] warning: {msg}", flush=True)
    logger.event("unreadable_images_warning", global_step=step, tried=tried, skipped=skipped, reasons=reasons)
    return True

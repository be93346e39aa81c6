"""What every loop's ``recipe: auto`` shares: the size of data set from which a recipe's own values
are what works (:data:`AUTO_MAX_IMAGES`), the facts the rules read of the data (:func:`data_facts`), a
choice with its reason (:class:`Choice`), and setting the values the user left unset (:func:`set_unset`).
The rules themselves are each loop's: DINO's :mod:`ssl_xcit.train.recipe`, fine-tuning's
:mod:`ssl_xcit.finetune.recipe`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# From this many images on, DINO's own recipe is what works (ImageNet-1k has 1.28M).
AUTO_MAX_IMAGES = 200_000


@dataclass(frozen=True)
class DataFacts:
    """What the rules read of the data: the number of images and the median shorter side (px)."""
    images: int
    image_side: int


@dataclass(frozen=True)
class Choice:
    value: Any
    reason: str


SAMPLE_FOR_SIZE = 64   # images whose size is read (evenly spread) for DataFacts.image_side


def data_facts(dataset) -> DataFacts:
    """The number of images and the median shorter side of ``SAMPLE_FOR_SIZE`` of them (evenly
    spread; ones that fail to load are left out). Sizes come from the image headers where the
    dataset can read them (``image_size``), so nothing is decoded."""
    from ssl_xcit.data.subsets import evenly_spread
    size_of = getattr(dataset, "image_size", None) or (lambda i: dataset.load(i).size)
    sides = []
    for i in dict.fromkeys(evenly_spread(len(dataset), SAMPLE_FOR_SIZE).tolist()):
        try:
            sides.append(min(size_of(i)))
        except Exception:  # noqa: BLE001 - an unreadable image says nothing about the others' size
            continue
    side = int(sorted(sides)[len(sides) // 2]) if sides else 224
    return DataFacts(images=len(dataset), image_side=side)


def set_unset(cfg, chosen: dict[str, Choice], user_set: set[str]) -> dict[str, Choice]:
    """Set each chosen value the user did not set, in place; returns what was set."""
    applied = {}
    for key, choice in chosen.items():
        if key not in user_set:
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, choice.value)
            applied[key] = choice
    return applied

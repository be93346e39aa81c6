"""``recipe: auto`` for fine-tuning: the values DeiT's ImageNet recipe cannot know, fit to the data.

DeiT and XCiT fine-tune at 224 px for 100-300 epochs with 5 of warm-up. On small data the two that
matter are the resolution, where upsampling 32-px images to 224 costs 49x the compute and adds no
information, and the warm-up, which should be a share of the run rather than a number of epochs.
The rest of DeiT's recipe (RandAugment, random erasing, mixup/cutmix, label smoothing, layer decay,
drop path) is kept: it is what regularises fine-tuning on few images. A value the user sets always
wins; each choice is printed and written into ``config.yaml`` with its reason.
"""
from __future__ import annotations

from typing import Any

from ssl_xcit.train.recipe import AUTO_MAX_IMAGES, Choice, data_facts, set_unset

WARMUP_FRACTION = 0.05   # DeiT: 5 of 100-300 epochs


def choose(images: int, image_side: int, patch_size: int, epochs: int, pretrained: bool = True
           ) -> dict[str, Choice]:
    """The values ``recipe: auto`` chooses for ``images`` labelled images of median side ``image_side``
    (``pretrained``: the run starts from pretrained weights, not random ones)."""
    side = max(2 * patch_size, patch_size * round(min(image_side, 224) / patch_size))
    extra = {} if pretrained else {"optim.layer_decay": Choice(1.0, "random weights: every layer must learn, none "
                                                                    "has anything to keep (DeiT from scratch uses no "
                                                                    "layer decay)")}
    return {**extra,
        "data.input_size": Choice(side, f"the images' median side {image_side} px (at most 224), a multiple of the "
                                        f"patch {patch_size}: upsampling small images costs compute, not information"),
        "optim.warmup_epochs": Choice(int(round(WARMUP_FRACTION * epochs)),
                                      f"{WARMUP_FRACTION:.0%} of the {epochs} epochs, as DeiT's 5 of 100"),
    }


def apply(cfg: Any, train_set: Any) -> str | None:
    """Set the chosen values the user left unset, in place; returns them with their reasons
    (``None``: nothing chosen, e.g. ``recipe: off`` or ``AUTO_MAX_IMAGES`` images or more)."""
    if cfg.run.recipe != "auto" or len(train_set) >= AUTO_MAX_IMAGES:
        return None
    from ssl_xcit.models.zoo import resolve
    from ssl_xcit.train.config import user_set_keys
    facts = data_facts(train_set)
    chosen = choose(facts.images, facts.image_side, resolve(cfg.model.arch).arch.patch_size, cfg.optim.epochs,
                    pretrained=bool(cfg.model.pretrained_weights))
    applied = set_unset(cfg, chosen, user_set_keys(cfg))
    cfg.validate()
    if not applied:
        return None
    head = (f"recipe: auto chose these for {facts.images:,} labelled images of median side {facts.image_side} px "
            "(a value you set always wins; recipe=off keeps the values as written):")
    return "\n".join([head] + [f"  {k}: {c.value}  # {c.reason}" for k, c in applied.items()])

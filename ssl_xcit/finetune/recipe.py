"""``recipe: auto`` for fine-tuning: the values DeiT's ImageNet recipe cannot know, fit to the data.

DeiT and XCiT fine-tune at 224 px for 100-300 epochs with 5 of warm-up. On small data the two that
matter are the resolution, where upsampling 32-px images to 224 costs 49x the compute and adds no
information, and the warm-up, which should be a share of the run rather than a number of epochs.
The rest of DeiT's recipe (RandAugment, label smoothing, drop path) is kept.

A short run (under ``SHORT_RUN_EPOCHS`` passes over the labelled images) is a different regime:
DeiT's mixup/cutmix and random erasing fight over-fitting, which a run that sees each image a few
times never reaches, so they only slow learning; DeiT's lr (5e-4 per 256, for 300 epochs) is too
low to move in a few hundred steps; BEiT's layer decay holds back the lower blocks, which in a
short run must move too. Measured (xcit_nano_12_p8 from the quickstart's DINO teacher, 600 steps of
64 at 32 px, seed 0, AMD EPYC 2-core, 2026-12-05; val top-1): on CIFAR-10, DeiT's values 35.64, lr
4e-3 37.05, + no mixup/cutmix/erasing 40.04 (layer decay 0.75), 43.43 (0.9), 44.03 (none); on
Imagenette, 50.01 (0.9), 52.82 (none). Measured only from that small CPU-trained start: from DINO's
ImageNet weights some layer decay may pay even in a short run (set ``layer_decay``). A value the user
sets always wins; each choice is printed and written into ``config.yaml`` with its reason.

From a pretrained start the run is LP-FT (:mod:`ssl_xcit.finetune.probe_head`): the head fitted on the
frozen start's features first, the backbone at ``LPFT_BACKBONE_LR_SCALE`` of the head's lr. Measured (issue 33; the quickstart's CIFAR-10 teacher, 2,000 labels,
``max_steps=250``, batch 64, 1,000 val images, AMD EPYC 2-core, 2026-12-08; val top-1 against the
start's probe scored at step 0): a random head and the full lr ended 3.3 below the probe (26.80 /
35.70 vs 39.00, the issue's figures); LP-FT with the BatchNorm statistics frozen and the backbone at 1.0 / 0.3 / 0.1 of the head's lr
ended -4.6 and -6.1 / -0.9 and -1.0 / 0.0 and -1.0 (seeds 1 and 2); at 0.1 with the statistics
updating (the default kept): +1.7, -1.6, -1.1 (seeds 0-2, the same mean as frozen, and +0.9 / +0.8
ahead of frozen at 10% / all labels). From that weak start 250 steps do not lift the features past
the probe on average; a lower backbone lr only keeps the probe's answer (benchmarks/RESULTS.md).
"""
from __future__ import annotations

from typing import Any

from ssl_xcit.engine.recipe import AUTO_MAX_IMAGES, Choice, data_facts, set_unset

WARMUP_FRACTION = 0.05   # DeiT: 5 of 100-300 epochs
SHORT_RUN_EPOCHS = 10    # measured at 1 epoch (600 steps on CIFAR-10); 10 is a margin, not a measurement
LPFT_BACKBONE_LR_SCALE = 0.1   # measured: see the module doc
SHORT_RUN_LR = 4e-3      # per 256 images, as ``optim.lr``: the best of 5e-4 / 4e-3 in the measurement above


def choose(images: int, image_side: int, patch_size: int, epochs: float, pretrained: bool = True
           ) -> dict[str, Choice]:
    """The values ``recipe: auto`` chooses for ``images`` labelled images of median side ``image_side``
    (``pretrained``: the run starts from pretrained weights, not random ones) and a run of ``epochs``
    passes over them (fractional when ``max_steps`` ends it: the length it really has)."""
    side = max(2 * patch_size, patch_size * round(min(image_side, 224) / patch_size))
    c = {"data.input_size": Choice(side, f"the images' median side {image_side} px (at most 224), a multiple of the "
                                         f"patch {patch_size}: upsampling small images costs compute, not information"),
         "optim.warmup_epochs": Choice(int(round(WARMUP_FRACTION * epochs)),
                                       f"{WARMUP_FRACTION:.0%} of the {epochs:g} epochs, as DeiT's 5 of 100")}
    if pretrained:
        c["optim.head_init"] = Choice("probe", "a pretrained start: the head is fitted on its frozen features first "
                                               "(LP-FT), so step 0 is the start's linear probe, not a random head "
                                               "whose first gradients undo what pretraining learned")
        c["optim.backbone_lr_scale"] = Choice(LPFT_BACKBONE_LR_SCALE, "the fitted head adapts at the full lr while "
                                              "the pretrained features move at a tenth of it (LP-FT)")
    if not pretrained:
        c["optim.layer_decay"] = Choice(1.0, "random weights: every layer must learn, none has anything to keep "
                                             "(DeiT from scratch uses no layer decay)")
    if epochs < SHORT_RUN_EPOCHS:
        short = f"a short run ({epochs:.3g} epochs < {SHORT_RUN_EPOCHS})"
        for key in ("mixup.mixup", "mixup.cutmix", "data.reprob"):
            c[key] = Choice(0.0, f"{short} never reaches the over-fitting that mixup, cutmix and random erasing "
                                 "fight: they only slow it (measured: see ssl_xcit/finetune/recipe.py)")
        c["optim.lr"] = Choice(SHORT_RUN_LR, f"{short}: DeiT's 5e-4 per 256 is set for 300 epochs and barely moves "
                                             "the weights in a few hundred steps")
        c["optim.layer_decay"] = Choice(1.0, f"{short}: every block must move in it; BEiT's layer decay holds "
                                             "the lower ones back (measured: see ssl_xcit/finetune/recipe.py)")
    return c


def apply(cfg: Any, train_set: Any, run_epochs: float | None = None) -> str | None:
    """Set the chosen values the user left unset, in place; returns them with their reasons
    (``None``: nothing chosen, e.g. ``recipe: off`` or ``AUTO_MAX_IMAGES`` images or more).
    ``run_epochs``: the run's length in epochs when ``max_steps`` ends it before ``epochs``."""
    if cfg.run.recipe != "auto" or len(train_set) >= AUTO_MAX_IMAGES:
        return None
    from ssl_xcit.models.zoo import resolve
    from ssl_xcit.engine.config import user_set_keys
    facts = data_facts(train_set)
    epochs = cfg.optim.epochs if run_epochs is None else run_epochs
    chosen = choose(facts.images, facts.image_side, resolve(cfg.model.arch).arch.patch_size, epochs,
                    pretrained=bool(cfg.model.pretrained_weights))
    applied = set_unset(cfg, chosen, user_set_keys(cfg))
    cfg.validate()
    if not applied:
        return None
    length = (f", a run of {epochs:.3g} epochs (max_steps={cfg.run.max_steps} ends it before epochs={cfg.optim.epochs})"
              if epochs != cfg.optim.epochs else "")
    head = (f"recipe: auto chose these for {facts.images:,} labelled images of median side {facts.image_side} px"
            f"{length} (a value you set always wins; recipe=off keeps the values as written):")
    return "\n".join([head] + [f"  {k}: {c.value}  # {c.reason}" for k, c in applied.items()])

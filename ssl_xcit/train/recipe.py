"""``recipe: auto``: DINO's hyper-parameters chosen for the data set at hand.

DINO's published values are tuned for ImageNet: 1.28M images of ~400 px, 100-800 epochs on 16+
GPUs. On a few thousand or tens of thousands of small images, and a budget of minutes to hours,
they learn slowly or collapse (dino#43, #61, #246, #273; dinov2#143, #407; this project's grid
in ``benchmarks/RESULTS.md``). Below ``AUTO_MAX_IMAGES`` images every value the user left unset is
chosen here from three facts: the number of images, their size, and the number of optimizer
steps (from ``epochs``, or measured against ``time_budget_minutes``). A value set in the config
file or on the command line always wins. Each choice comes with its reason, which the training
loop prints, logs and writes into ``config.yaml``.

    >>> facts = DataFacts(images=6400, image_side=32)
    >>> chosen = choose(facts, steps=400, embed_dim=128, patch_size=8, epochs=2)
    >>> chosen["model.out_dim"].value, chosen["data.global_crops_size"].value
    (1024, 32)
"""
from __future__ import annotations

import math

from ssl_xcit.engine.recipe import AUTO_MAX_IMAGES, Choice, DataFacts, data_facts, set_unset  # noqa: F401

# Prototypes per image: DINO uses 65,536 for 1.28M images, one per ~20; on small data as many
# prototypes as images spread the teacher too thin (the grid: 256-4,096 on 6,400 images within 1 point).
IMAGES_PER_PROTOTYPE = 16
MIN_OUT_DIM, MAX_OUT_DIM = 1024, 65536
# DINOv2's KoLeo weight (its loss: weight x the sum over the two global crops). DINOv2 uses 0.1;
# on CIFAR-10 at 400 steps 0.05 measured best (benchmarks/RESULTS.md, "KoLeo").
KOLEO_WEIGHT = 0.05
# An EMA teacher averages the last ~1/(1-m) student states: keep that window a tenth of the run,
# within DINO's 0.996 (250 steps) and 0.975 (40 steps). On the 400-step quickstart a tenth (0.975)
# beat a quarter (0.99) on 4 of 5 seeds, +0.7 points k-NN on average (benchmarks/RESULTS.md);
# below 0.975 the grid's 100-step runs lost (0.95: -2 points, 0.9: -3).
EMA_WINDOW_FRACTION = 0.1
MIN_MOMENTUM, MAX_MOMENTUM = 0.975, 0.996


def _pow2_between(x: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, 2 ** round(math.log2(max(x, 1))))))


def teacher_momentum(steps: int) -> Choice:
    """The EMA momentum whose window 1/(1-m) is a tenth of the run, in [0.975, 0.996]."""
    window = EMA_WINDOW_FRACTION * steps
    raw = 1.0 - 1.0 / max(window, 1.0)
    momentum = round(min(MAX_MOMENTUM, max(MIN_MOMENTUM, raw)), 4)
    kept = 1 / (1 - momentum)
    if raw < MIN_MOMENTUM - 1e-9:   # say it was clamped, and to what: the window is not a tenth of the run then
        return Choice(momentum, f"clamped to the lowest momentum {MIN_MOMENTUM} (an EMA window of {kept:.0f} "
                                f"steps): {EMA_WINDOW_FRACTION:.0%} of the {steps:,} steps would be a window of "
                                f"{window:.1f} steps, and windows under {kept:.0f} steps lost k-NN in the grid")
    if raw > MAX_MOMENTUM + 1e-9:
        return Choice(momentum, f"clamped to DINO's momentum {MAX_MOMENTUM} (an EMA window of {kept:.0f} steps): "
                                f"{EMA_WINDOW_FRACTION:.0%} of the {steps:,} steps would be a window of "
                                f"{window:,.0f} steps, longer than DINO's own")
    return Choice(momentum, f"an EMA window 1/(1-m) of {kept:.0f} steps: about "
                            f"{EMA_WINDOW_FRACTION:.0%} of the {steps:,} steps, kept in [{MIN_MOMENTUM}, "
                            f"{MAX_MOMENTUM}] (DINO's 0.996 averages 250 steps: most of a short run)")


def teacher_momenta(steps: int, user_momentum: float | None = None) -> dict[str, Choice]:
    """The EMA momentum for a run of ``steps`` and where its cosine ends: at its start (the user's
    ``momentum_teacher`` when set), not at DINO's 1."""
    start = teacher_momentum(steps)
    end = start.value if user_momentum is None else user_momentum
    return {"dino.momentum_teacher": start,
            "dino.final_momentum_teacher": Choice(end, "the momentum stays at momentum_teacher (DINO's cosine to 1 "
                                                       "freezes the teacher for the last part of a short run, and "
                                                       "it then lags the student)")}


def choose(facts: DataFacts, steps: int, embed_dim: int, patch_size: int, epochs: int = 1,
           user_momentum: float | None = None) -> dict[str, Choice]:
    """Every value ``recipe: auto`` would choose for ``facts`` and a run of ``steps`` optimizer
    steps in ``epochs`` epochs, keyed ``section.name`` (``user_momentum``: the user's
    ``momentum_teacher``, which the momentum's end follows). Pure: the same facts give the same values."""
    n, side = facts.images, facts.image_side
    c: dict[str, Choice] = {}

    # ---- the head: prototypes and width
    out_dim = _pow2_between(n / IMAGES_PER_PROTOTYPE, MIN_OUT_DIM, MAX_OUT_DIM)
    c["model.out_dim"] = Choice(out_dim, f"{n:,} images / {IMAGES_PER_PROTOTYPE} per prototype, as a power of 2 "
                                         f"in [{MIN_OUT_DIM}, {MAX_OUT_DIM}] (DINO: 65,536 for 1.28M)")
    c["model.use_bn_in_head"] = Choice(True, "BatchNorm in the head spreads the near-identical features of a fresh "
                                             "network, so the centred teacher is not uniform from the start (without "
                                             "it the quickstart collapses to a uniform teacher)")
    c["model.norm_last_layer"] = Choice(False, "a short run: the prototypes learn from the first step "
                                               "(DINO normalises them for stability over 100+ epochs)")
    hidden = _pow2_between(4 * embed_dim, 512, 2048)
    c["model.head_hidden_dim"] = Choice(hidden, f"4 x the backbone width {embed_dim}, in [512, 2048]")
    c["model.drop_path_rate"] = Choice(0.0, "stochastic depth regularises long runs; a short one needs every update")
    c["optim.freeze_last_layer"] = Choice(0, "the last layer trains from the first step (see norm_last_layer)")

    # ---- the teacher
    c.update(teacher_momenta(steps, user_momentum))
    c["dino.koleo_loss_weight"] = Choice(KOLEO_WEIGHT, "DINOv2's KoLeo spreads the class tokens of each batch: "
                                                      "a fresh network's are nearly parallel, and with DINO alone "
                                                      "a short run stalls near 35% CIFAR-10 k-NN (RESULTS.md)")
    c["dino.warmup_teacher_temp_epochs"] = Choice(0, "BatchNorm in the head keeps the teacher informative from the "
                                                     "start: no temperature warm-up needed")

    # ---- crops: the data's own resolution (at most DINO's 224), rounded to the patch
    g = max(patch_size * 2, patch_size * round(min(side, 224) / patch_size))
    c["data.global_crops_size"] = Choice(g, f"the images' median side {side} px (at most DINO's 224), a multiple "
                                            f"of the patch {patch_size}: no upsampling, which costs compute, not information")
    local = max(patch_size, patch_size * round(g * 96 / 224 / patch_size))
    c["data.local_crops_size"] = Choice(local, f"DINO's 96/224 of the global crop, a multiple of the patch {patch_size}")

    # ---- optimizer: DINO warms the lr up for 10 of its 100 epochs
    c["optim.warmup_epochs"] = lr_warmup(epochs)
    return c


def lr_warmup(epochs: int) -> Choice:
    """The lr warm-up of a run of ``epochs`` epochs: a tenth of them, as DINO's 10 of 100."""
    return Choice(epochs // 10, f"a tenth of the {epochs} epochs, as DINO's 10 of 100 (none in a run under 10 "
                                "epochs: BatchNorm in the head keeps the start stable)")


# ---------------------------------------------------------------- applying the choices to a config
# (the facts of the data and setting unset values: :mod:`ssl_xcit.engine.recipe`)

def apply_auto(cfg, facts: DataFacts, steps: int, user_set: set[str],
               pretrained: dict | None = None) -> dict[str, Choice]:
    """Set every chosen value the user did not set, in place; returns what was set. Nothing below
    ``recipe: auto``, at ``AUTO_MAX_IMAGES`` images or more, or for values set in a file or override.
    ``pretrained``: the facts of the file the run continues from (its choices replace the data's)."""
    if cfg.run.recipe != "auto" or facts.images >= AUTO_MAX_IMAGES:
        return {}
    from ssl_xcit.models.zoo import resolve
    spec = resolve(cfg.model.arch).arch
    chosen = choose(facts, steps, spec.embed_dim, spec.patch_size, cfg.optim.epochs, _user_momentum(cfg, user_set))
    if pretrained is not None:
        chosen.update(continuing(pretrained, steps, _user_momentum(cfg, user_set)))
    return set_unset(cfg, chosen, user_set)


# ---------------------------------------------------------------- continuing from pretrained weights
# Measured in benchmarks/continue_pretraining.py (benchmarks/RESULTS.md, "Continuing from weights";
# AMD EPYC 2-core, 2026-12-05): the quickstart's XCiT-nano/8 teacher (CIFAR-10 k-NN 40.15, Imagenette
# 39.90) continued 400 steps, seed 0, k-NN top-1 CIFAR / Imagenette after continuing on CIFAR-10 and on
# Imagenette. These values (0.996, 0.1): 40.55 / 39.65 and 42.00 / 39.70; momentum 0.975 with the
# backbone at the head's lr: 40.05 / 40.30 and 41.80 / 40.20; the file's backbone alone with a fresh
# head and zero centre at the from-scratch values: 41.60 / 40.65 and 40.85 / 41.55. No candidate was
# apart from another by more than the noise of 2,000 queries (about 1 point) on the old domain, and
# none moved the new one by the 5 points hoped for; these are kept as the ones that move the
# pretrained weights least, the safe side when the measurement cannot tell them apart.
CONTINUE_MOMENTUM = 0.996          # the teacher moves slowly away from the pretrained one
CONTINUE_BACKBONE_LR_SCALE = 0.1   # the pretrained backbone learns at a tenth of the head's lr
HEAD_WARMUP_FRACTION = 0.1         # a fresh head learns alone for this part of the run


def continuing(pretrained: dict, steps: int, user_momentum: float | None = None) -> dict[str, Choice]:
    """The values for a run that starts from ``pretrained`` (a file's facts), keyed ``section.name``."""
    c: dict[str, Choice] = {}
    name = pretrained.get("path", "the file")
    head = pretrained.get("head")
    if head:
        for key, value in head.items():
            c[key] = Choice(value, f"the DINO head of {name}: its prototypes load and go on, instead of a fresh "
                                   "head pushing random gradients into the trained backbone")
    else:
        warm = max(1, round(HEAD_WARMUP_FRACTION * steps))
        c["optim.freeze_backbone_steps"] = Choice(warm, f"the file has no DINO head: a fresh one learns alone on the "
                                                        f"pretrained features for {HEAD_WARMUP_FRACTION:.0%} of the run "
                                                        "before its gradients reach the backbone")
    if not pretrained.get("center"):
        c["dino.center_init"] = Choice("teacher", "the file has no loss centre: it starts at the pretrained teacher's "
                                                  "mean output, not at zero")
    momentum = CONTINUE_MOMENTUM if user_momentum is None else user_momentum
    c["dino.momentum_teacher"] = Choice(momentum, "the teacher starts trained: it follows the student slowly, "
                                                  "so what the weights knew is kept while the student adapts")
    c["dino.final_momentum_teacher"] = Choice(momentum, "kept at momentum_teacher for the whole run")
    c["optim.backbone_lr_scale"] = Choice(CONTINUE_BACKBONE_LR_SCALE, "the pretrained backbone learns at "
                                          f"{CONTINUE_BACKBONE_LR_SCALE:g} x the head's lr (as fine-tuning does), "
                                          "so the first steps do not undo it")
    return c


def replan(cfg, steps: int, steps_per_epoch: int, user_set: set[str]) -> dict[str, Choice]:
    """A time budget that planned ``steps``: the teacher momentum and the lr warm-up for that run
    length instead of the configured epochs', unless the user set them; returns what was set."""
    chosen = teacher_momenta(steps, _user_momentum(cfg, user_set))
    chosen["optim.warmup_epochs"] = lr_warmup(-(-steps // steps_per_epoch))
    return set_unset(cfg, chosen, user_set)


def _user_momentum(cfg, user_set: set[str]) -> float | None:
    return cfg.dino.momentum_teacher if "dino.momentum_teacher" in user_set else None


def describe(applied: dict[str, Choice], facts: DataFacts, steps: int) -> str:
    """The choices as ``config.yaml`` comments and console lines: one ``key: value  # reason`` each."""
    head = (f"recipe: auto chose these for {facts.images:,} images of median side {facts.image_side} px "
            f"and {steps:,} steps (a value you set always wins; recipe=off keeps the values as written):")
    return "\n".join([head] + [f"  {k}: {c.value}  # {c.reason}" for k, c in applied.items()])

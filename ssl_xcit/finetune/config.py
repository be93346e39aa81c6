"""The fine-tuning config: one dataclass tree, built by the engine's loader like pretraining's (:mod:`ssl_xcit.engine.config`:
YAML + ``key=value`` overrides, plain or with their section, every name unique) and sharing its
``run`` section, so the output folder, seed, precision, device, logging, saving and ``recipe`` keys
mean the same in both.

The defaults are DeiT's and XCiT's fine-tuning recipe, built from timm's pieces: RandAugment
``rand-m9-mstd0.5-inc1`` and random erasing 0.25 (``timm.data.create_transform``), mixup 0.8 /
cutmix 1.0 with label smoothing 0.1 (``timm.data.Mixup``), AdamW with layer-wise lr decay 0.75 (BEiT
and MAE fine-tune self-supervised ViTs so; ``timm.optim.create_optimizer_v2``), a cosine schedule with
warm-up, drop path 0.1, optional model EMA. ``recipe: auto`` fits the input size and the warm-up to
small data (:mod:`ssl_xcit.finetune.recipe`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ssl_xcit.engine.config import (MAX_EPOCHS, ConfigError, ConfigTree, OptimConfigBase, RunConfig, arch_patch_size,
                                     check_arch_name, check_finite, config_field, need, user_set_keys, validate_run)


HEAD_INITS = ("random", "probe")


@dataclass
class FinetuneModelConfig:
    arch: str = config_field("xcit_small_12_p16", "any name get_model accepts (with pretrained_weights and no arch: the file's)")
    pretrained_weights: str = config_field("", "the weights to fine-tune: any file load_backbone reads ('': random init, a baseline)")
    checkpoint_key: str = config_field("teacher", "which network of a DINO training checkpoint: teacher | student")
    drop_path_rate: float = config_field(0.1, "stochastic depth")
    model_ema: bool = config_field(False, "also keep an EMA of the weights (timm ModelEmaV3), validated and saved beside them")
    model_ema_decay: float = config_field(0.9998, "the EMA's decay per step")


@dataclass
class FinetuneDataConfig:
    data_path: str = config_field("", "labelled ImageFolder root with train/ and val/ class folders (or a .tar.gz of one)")
    input_size: int = config_field(224, "side of the training crops and of the validation images, in pixels")
    train_fraction: float = config_field(1.0, "use this fraction of each class's labelled train images (DINO's 1%/10% protocol)")
    labels_per_class: int = config_field(0, ">0: use this many labelled train images per class (instead of train_fraction)")
    num_workers: int = config_field(8, "data-loading worker processes per training process")
    auto_augment: str = config_field("rand-m9-mstd0.5-inc1", "timm's auto-augment policy ('none': off)")
    reprob: float = config_field(0.25, "random erasing probability")
    color_jitter: float = config_field(0.4, "colour jitter strength (with auto_augment, timm ignores it)")
    crop_scale: tuple[float, float] = config_field((0.08, 1.0), "area range of the random resized crop")
    max_val_images: int = config_field(0, ">0: validate on at most N val images, evenly spread")


@dataclass
class MixupConfig:
    mixup: float = config_field(0.8, "mixup alpha (0: off)")
    cutmix: float = config_field(1.0, "cutmix alpha (0: off)")
    mixup_prob: float = config_field(1.0, "probability of mixing a batch")
    mixup_switch_prob: float = config_field(0.5, "probability of cutmix instead of mixup when both are on")
    smoothing: float = config_field(0.1, "label smoothing")


@dataclass
class FinetuneOptimConfig(OptimConfigBase):
    warmup_epochs: int = config_field(5, "epochs of the linear learning-rate warm-up")
    weight_decay: float = config_field(0.05, "AdamW weight decay (not on biases, norms, cls token, positional encoding)")
    layer_decay: float = config_field(0.75, "layer-wise lr decay: block i of L learns at lr x layer_decay^(L-i) (1: off)")
    clip_grad: float = config_field(0.0, "global gradient-norm clip (0: off)")
    freeze_backbone_steps: int = config_field(0, "steps in which only the new classifier head learns (linear probe, "
                                                 "then fine-tune)")
    time_budget_minutes: float = config_field(0.0, ">0: train this long; recipe=auto and the lr schedule plan for it")
    head_init: str = config_field("random", "the classifier head's start: random | probe (fitted on the frozen "
                                            "start's features first, as the cached linear probe: LP-FT)")
    backbone_lr_scale: float = config_field(1.0, "the backbone's lr as a fraction of the head's (LP-FT: below 1)")
    freeze_norm_stats: bool = config_field(False, "keep the backbone's BatchNorm running statistics as the start has "
                                                  "them (its weights still learn)")


@dataclass
class FinetuneEvalConfig:
    eval_every_epochs: int = config_field(1, "validate every N epochs (at the epoch's end)")
    eval_every_steps: int = config_field(0, ">0: also validate every N optimizer steps")
    eval_batch_size: int = config_field(128, "validation images per process and batch")


@dataclass
class FinetuneConfig(ConfigTree):
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/finetune"))
    eval: FinetuneEvalConfig = field(default_factory=FinetuneEvalConfig)

    PATH_KEYS = ("data.data_path", "run.output_dir", "model.pretrained_weights")
    LOOP = "ssl_xcit.finetune.loop:train"

    def validate(self) -> "FinetuneConfig":
        """Cross-field checks with messages a user can act on."""
        m, d, x, o, r, e = self.model, self.data, self.mixup, self.optim, self.run, self.eval
        check_finite(self)
        need(m.checkpoint_key in ("teacher", "student"), f"checkpoint_key must be teacher or student, got {m.checkpoint_key!r}")
        need(0.0 <= m.drop_path_rate < 1.0, f"drop_path_rate must be in [0, 1), got {m.drop_path_rate}")
        need(0.0 < m.model_ema_decay < 1.0, f"model_ema_decay must be in (0, 1), got {m.model_ema_decay}")
        need(d.input_size > 0, f"input_size must be positive, got {d.input_size}")
        need(0.0 < d.train_fraction <= 1.0, f"train_fraction must be in (0, 1], got {d.train_fraction}")
        need(d.labels_per_class >= 0, f"labels_per_class must be >= 0, got {d.labels_per_class}")
        need(d.num_workers >= 0 and d.max_val_images >= 0, "num_workers and max_val_images must be >= 0")
        need(0.0 <= d.reprob <= 1.0, f"reprob must be in [0, 1], got {d.reprob}")
        lo, hi = d.crop_scale
        need(0.0 < lo <= hi <= 1.0, f"crop_scale must satisfy 0 < min <= max <= 1, got {[lo, hi]}")
        need(x.mixup >= 0 and x.cutmix >= 0, "mixup and cutmix must be >= 0")
        need(0.0 <= x.mixup_prob <= 1.0 and 0.0 <= x.mixup_switch_prob <= 1.0,
             "mixup_prob and mixup_switch_prob must be in [0, 1]")
        need(0.0 <= x.smoothing < 1.0, f"smoothing must be in [0, 1), got {x.smoothing}")
        need(0 < o.epochs <= MAX_EPOCHS, f"epochs must be in [1, {MAX_EPOCHS}], got {o.epochs}")
        need(o.batch_size_per_gpu > 0, f"batch_size_per_gpu must be positive, got {o.batch_size_per_gpu}")
        need(o.lr > 0 and o.min_lr >= 0, "lr must be positive and min_lr non-negative")
        # a default warm-up longer than the run: recipe=auto chooses, or the warm-up is the run
        need(0 <= o.warmup_epochs and (o.warmup_epochs <= o.epochs or "optim.warmup_epochs" not in user_set_keys(self)),
             f"warmup_epochs ({o.warmup_epochs}) must be in [0, epochs={o.epochs}]")
        need(o.weight_decay >= 0, f"weight_decay must be >= 0, got {o.weight_decay}")
        need(0.0 < o.layer_decay <= 1.0, f"layer_decay must be in (0, 1], got {o.layer_decay}")
        need(o.clip_grad >= 0, f"clip_grad must be >= 0, got {o.clip_grad}")
        need(o.freeze_backbone_steps >= 0, f"freeze_backbone_steps must be >= 0, got {o.freeze_backbone_steps}")
        need(o.time_budget_minutes >= 0, f"time_budget_minutes must be >= 0, got {o.time_budget_minutes}")
        need(not (o.time_budget_minutes > 0 and "run.max_steps" in user_set_keys(self)),
             "set one length: time_budget_minutes or max_steps, not both")
        need(o.head_init in HEAD_INITS, f"head_init must be one of {' | '.join(HEAD_INITS)}, got {o.head_init!r}")
        need(o.head_init != "probe" or bool(m.pretrained_weights),
             "head_init=probe fits the head on the pretrained start's features: set pretrained_weights "
             "(random weights have nothing to probe)")
        need(0.0 < o.backbone_lr_scale <= 1.0, f"backbone_lr_scale must be in (0, 1], got {o.backbone_lr_scale}")
        need(e.eval_every_epochs >= 0 and e.eval_every_steps >= 0, "eval_every_epochs and eval_every_steps must be >= 0")
        need(e.eval_batch_size > 0, f"eval_batch_size must be positive, got {e.eval_batch_size}")
        validate_run(r)
        check_arch_name(m.arch)
        if not m.pretrained_weights or "model.arch" in user_set_keys(self):   # else the file's arch, not known yet
            check_input_size(self)
        return self


def check_input_size(cfg: FinetuneConfig) -> None:
    """One line, not the model's traceback, for an input the arch's patches do not tile."""
    patch = arch_patch_size(cfg.model.arch)
    size = cfg.data.input_size
    if patch and size % patch:
        raise ConfigError(f"input_size={size} is not divisible by the patch size {patch} of {cfg.model.arch}: use a "
                          f"multiple of {patch} (e.g. {max(patch, size // patch * patch)})")

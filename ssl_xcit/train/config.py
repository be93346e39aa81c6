"""DINO's typed run configuration: the sections of :class:`DinoConfig`, built once from YAML +
``key=value`` overrides by the engine's loader (:mod:`ssl_xcit.engine.config`), and its checks.

The field names are DINO's command-line flags (``arch``, ``out_dim``, ``teacher_temp``,
``local_crops_number``, ...) so recipes and habits carry over. Every field name is unique across
sections, so an override may name it plainly (``lr=1e-3``) or with its section (``optim.lr=1e-3``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from ssl_xcit.engine import config as config_loader
from ssl_xcit.engine.config import (MAX_EPOCHS, ConfigError, ConfigTree, OptimConfigBase, RunConfig,  # noqa: F401
                                    arch_patch_size, check_arch_name, check_finite, config_field, find_recipe, need,
                                    recipes_dir, user_set_keys, user_values, validate_run)


@dataclass
class ModelConfig:
    arch: str = config_field("xcit_small_12_p16", "any name get_model accepts")
    drop_path_rate: float = config_field(0.1, "stochastic depth, student only")
    out_dim: int = config_field(65536, "prototypes of the DINO head")
    norm_last_layer: bool = config_field(True, "weight-normalised last layer with g fixed to 1")
    use_bn_in_head: bool = config_field(False, "BatchNorm in the DINO head's MLP")
    head_hidden_dim: int = config_field(2048, "width of the DINO head's hidden layers")
    head_bottleneck_dim: int = config_field(256, "width of the head's bottleneck before the prototypes")
    head_nlayers: int = config_field(3, "layers of the head's MLP")
    pretrained_weights: str = config_field("", "start a new run from this file (any format load_backbone reads; '': random)")
    pretrained_checkpoint_key: str = config_field("auto", "a DINO file's networks: auto (student->student, teacher->teacher), "
                                                "teacher or student (that one into both)")


@dataclass
class DataConfig:
    data_path: str = config_field("", "ImageFolder / flat folder of images, or a .tar(.gz) of one")
    global_crops_size: int = config_field(224, "side of the 2 global crops, in pixels")
    global_crops_scale: tuple[float, float] = config_field((0.4, 1.0), "area range of a global crop (fractions of the image)")
    local_crops_number: int = config_field(8, "small local crops per image (0: no multi-crop)")
    local_crops_size: int = config_field(96, "side of the local crops, in pixels")
    local_crops_scale: tuple[float, float] = config_field((0.05, 0.4), "area range of a local crop (fractions of the image)")
    blur_probs: tuple[float, float, float] = config_field((1.0, 0.1, 0.5), "blur probability: global 1, global 2, locals")
    solarize_prob: float = config_field(0.2, "solarization probability of global crop 2")
    num_workers: int = config_field(8, "data-loading worker processes per training process")
    max_images: int = config_field(0, ">0: use only the first N images (quick runs, tests)")
    augment: str = config_field("cpu", "cpu: PIL per image in the workers | gpu: batched on run.device")


@dataclass
class DinoLossConfig:
    teacher_temp: float = config_field(0.04, "teacher softmax temperature after its warm-up")
    warmup_teacher_temp: float = config_field(0.04, "teacher temperature at the start of the warm-up")
    warmup_teacher_temp_epochs: int = config_field(0, "epochs of the linear teacher-temperature warm-up")
    student_temp: float = config_field(0.1, "student softmax temperature")
    center_momentum: float = config_field(0.9, "EMA momentum of the teacher's output centre")
    momentum_teacher: float = config_field(0.996, "EMA momentum at the start, cosine to final_momentum_teacher")
    final_momentum_teacher: float = config_field(1.0, "EMA momentum at the end (DINOv2's name; DINO: 1, the teacher freezes)")
    koleo_loss_weight: float = config_field(0.0, "DINOv2's KoLeo on the student's global crops (0: DINO as written)")
    center_init: str = config_field("zero", "zero (DINO) | teacher: the teacher's mean output on the first batch")


@dataclass
class OptimConfig(OptimConfigBase):
    weight_decay: float = config_field(0.04, "weight decay at the start (cosine schedule)")
    weight_decay_end: float = config_field(0.4, "weight decay at the end")
    clip_grad: float = config_field(3.0, "per-parameter gradient-norm clip (0 disables)")
    freeze_last_layer: int = config_field(1, "epochs with the head's last layer frozen")
    optimizer: str = config_field("adamw", "adamw | sgd")
    fused: bool | None = config_field(None, "fused optimizer kernels; null: on CUDA only (same update)")
    time_budget_minutes: float = config_field(0.0, ">0: train this long; recipe=auto sizes the schedules to it")
    freeze_backbone_steps: int = config_field(0, "steps in which only the student's head learns (a fresh head's warm-up)")
    backbone_lr_scale: float = config_field(1.0, "the student backbone's lr as a fraction of the head's")


@dataclass
class EvalConfig:
    """k-NN of the teacher while training (ssl_xcit.train.monitor): off unless eval_every_* > 0."""
    eval_every_epochs: int = config_field(0, ">0: k-NN every N epochs (at the epoch's end)")
    eval_every_steps: int = config_field(0, ">0: k-NN every N optimizer steps")
    eval_data_path: str = config_field("", "ImageFolder (or .tar.gz of one) with train/ and val/")
    eval_max_images: int = config_field(0, ">0: at most N images of train/ and N of val/, evenly spread")
    eval_knn_k: int = config_field(20, "neighbours of DINO's weighted vote (T = 0.07)")
    eval_crop_size: int = config_field(0, "0: global_crops_size (the training resolution)")
    eval_resize: int = config_field(0, "shorter side before the crop; 0: crop * 256 / 224 (DINO)")
    eval_batch_size: int = config_field(128, "images per step of the k-NN feature extraction")


@dataclass
class DinoConfig(ConfigTree):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dino: DinoLossConfig = field(default_factory=DinoLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # the keys that name files or folders: made absolute where the command is typed
    PATH_KEYS = ("data.data_path", "run.output_dir", "eval.eval_data_path", "model.pretrained_weights")
    LOOP = "ssl_xcit.train.loop:train"

    def validate(self) -> "DinoConfig":
        return validate(self)


# DINO's config unless told otherwise: the engine's loader and mapping reader with this schema
load_config = functools.partial(config_loader.load_config, schema=DinoConfig)
config_from_dict = functools.partial(config_loader.config_from_dict, schema=DinoConfig)


def _validate_eval(e: EvalConfig) -> None:
    for name in ("eval_every_epochs", "eval_every_steps", "eval_max_images", "eval_crop_size", "eval_resize"):
        if getattr(e, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(e, name)}")
    for name in ("eval_knn_k", "eval_batch_size"):
        if getattr(e, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(e, name)}")
    if (e.eval_every_epochs or e.eval_every_steps) and not e.eval_data_path:
        raise ConfigError("eval_every_epochs / eval_every_steps need eval_data_path=<folder with train/ and val/>")
    if e.eval_crop_size and e.eval_resize and e.eval_resize < e.eval_crop_size:
        raise ConfigError(f"eval_resize ({e.eval_resize}) must be >= eval_crop_size ({e.eval_crop_size})")


def validate(cfg: DinoConfig) -> DinoConfig:
    """Cross-field checks with messages a user can act on."""
    m, d, l, o, r = cfg.model, cfg.data, cfg.dino, cfg.optim, cfg.run
    check_finite(cfg)

    need(m.out_dim > 0, f"out_dim must be positive, got {m.out_dim}")
    need(0.0 <= m.drop_path_rate < 1.0, f"drop_path_rate must be in [0, 1), got {m.drop_path_rate}")
    need(d.local_crops_number >= 0, f"local_crops_number must be >= 0, got {d.local_crops_number}")
    for name in ("global_crops_scale", "local_crops_scale"):
        lo, hi = getattr(d, name)
        need(0.0 < lo <= hi <= 1.0, f"{name} must satisfy 0 < min <= max <= 1, got {[lo, hi]}")
    need(d.global_crops_size > 0 and d.local_crops_size > 0, "crop sizes must be positive")
    need(d.num_workers >= 0, f"num_workers must be >= 0, got {d.num_workers}")
    need(d.max_images >= 0, f"max_images must be >= 0, got {d.max_images}")
    need(d.augment in ("cpu", "gpu"), f"augment must be cpu or gpu, got {d.augment!r}")
    need(l.teacher_temp > 0 and l.warmup_teacher_temp > 0 and l.student_temp > 0,
         "temperatures must be positive")
    need(0.0 <= l.center_momentum < 1.0, f"center_momentum must be in [0, 1), got {l.center_momentum}")
    need(0.0 <= l.momentum_teacher <= 1.0, f"momentum_teacher must be in [0, 1], got {l.momentum_teacher}")
    need(0.0 <= l.final_momentum_teacher <= 1.0,
         f"final_momentum_teacher must be in [0, 1], got {l.final_momentum_teacher}")
    need(l.warmup_teacher_temp_epochs >= 0, "warmup_teacher_temp_epochs must be >= 0")
    need(l.koleo_loss_weight >= 0, f"koleo_loss_weight must be >= 0, got {l.koleo_loss_weight}")
    need(l.koleo_loss_weight == 0 or o.batch_size_per_gpu >= 2,
         "koleo_loss_weight > 0 needs batch_size_per_gpu >= 2 (KoLeo compares each image with the others "
         "of its batch)")
    need(o.epochs > 0, f"epochs must be positive, got {o.epochs}")
    need(o.epochs <= MAX_EPOCHS, f"epochs must be at most {MAX_EPOCHS:,} (the lr, weight-decay and momentum "
                                 f"schedules hold one value per step of every epoch), got {o.epochs}")
    need(o.batch_size_per_gpu > 0, f"batch_size_per_gpu must be positive, got {o.batch_size_per_gpu}")
    need(o.lr > 0 and o.min_lr >= 0, "lr must be positive and min_lr non-negative")
    need(o.weight_decay >= 0 and o.weight_decay_end >= 0,
         f"weight_decay and weight_decay_end must be >= 0, got {o.weight_decay} and {o.weight_decay_end}")
    # DINO's default 10 warm-up epochs on a shorter run: recipe=auto chooses, or the warm-up is the run
    need(0 <= o.warmup_epochs and (o.warmup_epochs <= o.epochs or "optim.warmup_epochs" not in user_set_keys(cfg)),
         f"warmup_epochs ({o.warmup_epochs}) must be in [0, epochs={o.epochs}]")
    need(l.warmup_teacher_temp_epochs <= o.epochs or l.warmup_teacher_temp_epochs == 0,
         f"warmup_teacher_temp_epochs ({l.warmup_teacher_temp_epochs}) exceeds epochs ({o.epochs})")
    need(o.clip_grad >= 0, f"clip_grad must be >= 0, got {o.clip_grad}")
    need(o.freeze_backbone_steps >= 0, f"freeze_backbone_steps must be >= 0, got {o.freeze_backbone_steps}")
    need(0 < o.backbone_lr_scale <= 1, f"backbone_lr_scale must be in (0, 1], got {o.backbone_lr_scale}")
    need(l.center_init in ("zero", "teacher"), f"center_init must be zero or teacher, got {l.center_init!r}")
    need(m.pretrained_checkpoint_key in ("auto", "teacher", "student"),
         f"pretrained_checkpoint_key must be auto, teacher or student, got {m.pretrained_checkpoint_key!r}")
    need(o.freeze_last_layer >= 0, f"freeze_last_layer must be >= 0, got {o.freeze_last_layer}")
    need(o.optimizer in ("adamw", "sgd"), f"optimizer must be adamw or sgd, got {o.optimizer!r}")
    need(o.time_budget_minutes >= 0, f"time_budget_minutes must be >= 0, got {o.time_budget_minutes}")
    validate_run(r)
    _validate_eval(cfg.eval)
    check_arch_name(m.arch)
    patch = arch_patch_size(m.arch)
    if patch:
        for name in ("global_crops_size", "local_crops_size"):
            size = getattr(d, name)
            need(size % patch == 0 or (name == "local_crops_size" and d.local_crops_number == 0),
                 f"{name}={size} is not divisible by the patch size {patch} of {m.arch}: use a multiple "
                 f"of {patch} (e.g. {max(patch, size // patch * patch)})")
    return cfg

"""The typed run configuration: one dataclass tree, built once from YAML + ``key=value`` overrides.

The field names are DINO's command-line flags (``arch``, ``out_dim``, ``teacher_temp``,
``local_crops_number``, ...) so recipes and habits carry over. Every field name is unique across
sections, so an override may name it plainly (``lr=1e-3``) or with its section (``optim.lr=1e-3``).
Each field carries its one-line meaning (``config_field``), which ``launch/train.py --help`` lists. The recipes
(``*.yaml``) live in the package (``ssl_xcit/configs``; ``configs/`` in a checkout links there), so an
installed package finds them by name (:func:`find_recipe`).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ssl_xcit.errors import UserError


class ConfigError(UserError, ValueError):
    """A bad config file, key or value; the message says which and why."""


# The lr, weight-decay and teacher-momentum schedules hold one value per training step of every
# epoch (ssl_xcit.dino.schedules), so an absurd epoch count fails late with a MemoryError; DINO's
# longest recipe is 800 epochs.
MAX_EPOCHS = 10_000


def config_field(default: Any, meaning: str) -> Any:
    """A config field with its one-line meaning, which ``launch/train.py --help`` prints beside
    the key and its default (the meaning lives with the field, so the help cannot drift from it)."""
    return field(default=default, metadata={"help": meaning})


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
class OptimConfig:
    epochs: int = config_field(100, "training epochs")
    batch_size_per_gpu: int = config_field(64, "images per process (per GPU) and step")
    lr: float = config_field(5e-4, "peak learning rate at a global batch of 256; scaled linearly")
    min_lr: float = config_field(1e-6, "learning rate at the end of the cosine schedule")
    warmup_epochs: int = config_field(10, "epochs of the linear learning-rate warm-up")
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
class RunConfig:
    output_dir: str = config_field("runs/dino", "folder of config.yaml, log.jsonl, checkpoints (a run there resumes)")
    seed: int = config_field(0, "random seed (weights, data order, augmentations)")
    precision: str = config_field("bf16", "bf16 | fp16 | fp32 (autocast dtype; fp16 uses a scaler)")
    device: str = config_field("auto", "auto | cpu | cuda")
    saveckp_freq: int = config_field(0, ">0: also keep checkpoint{epoch:04}.pth every N epochs")
    save_every_steps: int = config_field(0, ">0: checkpoint every N steps inside an epoch")
    log_every_steps: int = config_field(10, "a train record in log.jsonl (and TensorBoard) every N steps")
    max_steps: int = config_field(0, ">0: stop after this many steps (quick runs, tests)")
    sync_bn: bool = config_field(True, "convert BatchNorm to SyncBatchNorm under DDP")
    compile: bool = config_field(False, "torch.compile the backbone (per crop resolution)")
    deterministic: bool = config_field(False, "torch.use_deterministic_algorithms, for exact resume on GPU")
    tensorboard: bool = config_field(True, "also write TensorBoard events to output_dir/tensorboard")
    report: bool = config_field(True, "write output_dir/report/index.html when the run finishes")
    recipe: str = config_field("auto", "auto: on < 200k images, values you leave unset fit the data "
                             "(ssl_xcit/train/recipe.py); off: the values as written")


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


class ConfigTree:
    """What every run's config is: a dataclass of sections (dataclasses of fields), every field name
    unique across its sections. Pretraining's :class:`DinoConfig` and fine-tuning's
    (:class:`ssl_xcit.finetune.config.FinetuneConfig`) are both built by :func:`load_config`."""

    PATH_KEYS: tuple[str, ...] = ()    # the keys that name files or folders (see :func:`pin_paths`)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for section in out.values():  # tuples -> lists so YAML and weights_only loads stay plain
            for key, value in section.items():
                if isinstance(value, tuple):
                    section[key] = list(value)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> "ConfigTree":
        raise NotImplementedError


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

    def validate(self) -> "DinoConfig":
        return validate(self)


def _section_classes(schema: type = DinoConfig) -> dict[str, type]:
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def _field_index(schema: type = DinoConfig) -> dict[str, str]:
    """Plain field name -> its section. Names are unique across sections by design."""
    index: dict[str, str] = {}
    for section, cls in _section_classes(schema).items():
        for f in dataclasses.fields(cls):
            if f.name in index:
                raise AssertionError(f"field {f.name} appears in two sections")
            index[f.name] = section
    return index


def config_fields(schema: type = DinoConfig) -> list[tuple[str, dataclasses.Field, Any]]:
    """``(section, field, type)`` of every key, in section order: what command lines build their
    options and their help from (the type resolved from the annotation)."""
    out = []
    for section, cls in _section_classes(schema).items():
        hints = typing.get_type_hints(cls)
        out.extend((section, f, hints[f.name]) for f in dataclasses.fields(cls))
    return out


def _all_keys(schema: type = DinoConfig) -> list[str]:
    index = _field_index(schema)
    return [f"{s}.{k}" for k, s in index.items()] + list(index)


def _unknown_key(key: str, schema: type = DinoConfig) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys(schema), n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the field's type; accept ints for floats and lists for tuples."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin in (typing.Union, types.UnionType):
        errors = []
        for a in typing.get_args(hint):
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} does not fit {hint}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key} must be null")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if hint is str:
        if key == "run.recipe" and isinstance(value, bool):   # YAML reads a bare off / on as a bool
            return "auto" if value else "off"
        if isinstance(value, (str, Path)):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def _set(cfg: ConfigTree, key: str, value: Any) -> None:
    schema = type(cfg)
    index = _field_index(schema)
    if "." in key:
        section, name = key.split(".", 1)
        if section not in _section_classes(schema) or index.get(name) != section:
            raise _unknown_key(key, schema)
    else:
        if key not in index:
            raise _unknown_key(key, schema)
        section, name = index[key], key
    sub = getattr(cfg, section)
    hint = typing.get_type_hints(type(sub))[name]
    setattr(sub, name, _coerce(value, hint, f"{section}.{name}"))
    user_set_keys(cfg).add(f"{section}.{name}")


def user_set_keys(cfg: DinoConfig) -> set[str]:
    """``section.name`` of every value set by a config file or an override (not a default). Kept
    beside the dataclass fields, so ``to_dict`` and checkpoints stay as they were."""
    return cfg.__dict__.setdefault("_user_set", set())


def user_values(cfg: DinoConfig) -> dict[str, dict[str, Any]]:
    """The values a config file or an override set, as a nested mapping (tuples as lists):
    ``config_from_dict(user_values(cfg))`` rebuilds ``cfg`` with the same values *and* the same
    user-set keys. Why not ``to_dict``: rebuilt from every value, a config marks every key as the
    user's, so ``recipe: auto`` (which fills in only what the user left unset) would choose nothing
    and a SLURM job would train DINO's ImageNet values where the same command run locally trains
    the small-data recipe."""
    out: dict[str, dict[str, Any]] = {}
    for key in sorted(user_set_keys(cfg)):
        section, name = key.split(".", 1)
        value = getattr(getattr(cfg, section), name)
        out.setdefault(section, {})[name] = list(value) if isinstance(value, tuple) else value
    return out


def config_from_dict(data: dict[str, Any], cfg: ConfigTree | None = None, schema: type = DinoConfig) -> Any:
    """Apply a nested (``{optim: {lr: ..}}``) or flat (``{lr: ..}``) mapping onto a config (a new
    ``schema`` when none is given)."""
    cfg = cfg if cfg is not None else schema()
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(data).__name__}")
    sections = _section_classes(type(cfg))
    for key, value in data.items():
        if key in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"section '{key}' must be a mapping, got {value!r}")
            for sub_key, sub_value in value.items():
                _set(cfg, f"{key}.{sub_key}", sub_value)
        else:
            _set(cfg, str(key), value)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with a YAML value (``lr=1e-3``, ``global_crops_scale=[0.3,1]``)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': value is not valid YAML ({err})") from err
    if isinstance(value, str) and raw.strip() and _looks_numeric(raw):
        value = float(raw)  # YAML 1.1 reads 1e-3 as a string
    return key, value


def _looks_numeric(raw: str) -> bool:
    try:
        float(raw)
        return True
    except ValueError:
        return False


def recipes_dir() -> Path:
    """The folder of the packaged recipes (``ssl_xcit/configs``, package data of an installed wheel)."""
    import importlib.resources
    return Path(str(importlib.resources.files("ssl_xcit") / "configs"))


def find_recipe(text: str | Path) -> Path:
    """``text`` when that file exists; else the packaged recipe it names, from any folder
    (``quickstart``, ``quickstart.yaml`` or ``configs/quickstart.yaml``): an installed package has
    no ``configs/`` beside the working folder. A name that is neither is a :class:`ConfigError`
    listing the packaged recipes."""
    path = Path(text).expanduser()
    if path.exists():
        return path
    name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    packaged = recipes_dir() / name
    if packaged.is_file() and path.parent.name in ("", "configs"):
        return packaged
    available = ", ".join(sorted(p.stem for p in recipes_dir().glob("*.yaml")))
    raise ConfigError(f"config file not found: {text} (packaged recipes, by name: {available})")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                schema: type = DinoConfig) -> Any:
    """Build the config: defaults <- YAML file <- ``key=value`` overrides, then validate
    (``schema``: :class:`DinoConfig`, or fine-tuning's config)."""
    cfg = schema()
    if path is not None:
        _apply_file(cfg, Path(path), seen=())
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, _yaml_float_fix(value))
    pin_paths(cfg)
    cfg.validate()
    return cfg


def _apply_file(cfg: ConfigTree, path: Path, seen: tuple[Path, ...]) -> None:
    """A recipe file onto ``cfg``; ``_base_: other.yaml`` (beside it) is applied first, so a recipe
    can be a few lines over a base file, as DINOv2's configs are."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give a recipe file (e.g. configs/quickstart.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: _base_ files include each other ({' -> '.join(p.name for p in seen)})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if isinstance(data, dict) and "_base_" in data:
        base = data.pop("_base_")
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{path}: _base_ must name a recipe file, got {base!r}")
        _apply_file(cfg, path.parent / base, (*seen, path.resolve()))
    try:
        config_from_dict(data, cfg)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def pin_paths(cfg: ConfigTree) -> ConfigTree:
    """Make the path keys absolute (``~`` expanded), against the folder the command runs
    in. Every launcher loads its config through :func:`load_config`, so ``launch/train.py``, torchrun
    and a SLURM job (which may start in another folder) all record and use the same paths; a comma
    list of shards is pinned part by part, and a brace pattern is kept as a pattern."""
    for key in cfg.PATH_KEYS:
        section, name = key.split(".", 1)
        text = getattr(getattr(cfg, section), name)
        if not text:
            continue
        parts = text.split(",") if "," in text and not os.path.exists(text) else [text]
        _set(cfg, key, ",".join(os.path.abspath(os.path.expanduser(p.strip())) for p in parts))
    return cfg


def _yaml_float_fix(value: Any) -> Any:
    if isinstance(value, list):
        return [float(v) if isinstance(v, str) and _looks_numeric(v) else v for v in value]
    return value


def check_finite(cfg: ConfigTree) -> None:
    """No inf or nan anywhere: ``lr=inf`` would otherwise train (and checkpoint) NaN weights."""
    for section in _section_classes(type(cfg)):
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            numbers = value if isinstance(value, (tuple, list)) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                raise ConfigError(f"{section}.{f.name} must be a finite number, got {value!r}")


def arch_patch_size(arch: str) -> int | None:
    """The patch size of an architecture from the torch-free zoo table (``None`` if unknown)."""
    try:
        from ssl_xcit.models.zoo import resolve  # light import: the name table only
        return resolve(arch).arch.patch_size
    except (ImportError, ValueError, TypeError):
        return None


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


def validate_run(r: RunConfig) -> None:
    """The ``run`` section, which pretraining and fine-tuning share."""
    for cond, msg in ((r.recipe in ("auto", "off"), f"recipe must be auto or off, got {r.recipe!r}"),
                      (r.precision in ("bf16", "fp16", "fp32"), f"precision must be bf16, fp16 or fp32, got {r.precision!r}"),
                      (r.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {r.device!r}"),
                      (bool(r.output_dir), "output_dir must not be empty"),
                      (r.log_every_steps > 0, "log_every_steps must be positive")):
        if not cond:
            raise ConfigError(msg)
    for name in ("saveckp_freq", "save_every_steps", "max_steps"):
        if getattr(r, name) < 0:
            raise ConfigError(f"{name} must be >= 0")


def check_arch_name(arch: str) -> None:
    """An architecture the zoo knows, checked from the torch-free name table."""
    try:
        from ssl_xcit.models.zoo import resolve_arch  # light import: the zoo table only
    except ImportError:
        return
    try:
        resolve_arch(arch)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def validate(cfg: DinoConfig) -> DinoConfig:
    """Cross-field checks with messages a user can act on."""
    m, d, l, o, r = cfg.model, cfg.data, cfg.dino, cfg.optim, cfg.run

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

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

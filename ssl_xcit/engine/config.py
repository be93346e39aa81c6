"""The config machinery every training loop shares: a config is a dataclass of sections
(:class:`ConfigTree`), built once from defaults <- a YAML recipe (``_base_:`` files first) <-
``key=value`` overrides (:func:`load_config`), every field name unique across its sections so an
override may name it plainly (``lr=1e-3``) or with its section (``optim.lr=1e-3``). Each field
carries its one-line meaning (:func:`config_field`), which a command's ``--help`` lists. The ``run``
section (:class:`RunConfig`: folder, seed, precision, device, logging, saving, ``recipe``) is the
same in every loop. The recipes (``*.yaml``) live in the package (``ssl_xcit/configs``), so an
installed package finds them by name (:func:`find_recipe`).

A loop's own schema (DINO's :class:`ssl_xcit.train.config.DinoConfig`, fine-tuning's
:class:`ssl_xcit.finetune.config.FinetuneConfig`) is passed as ``schema``: nothing here knows them.
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


def need(cond: bool, msg: str) -> None:
    """A config check: ``msg`` as a :class:`ConfigError` unless ``cond``."""
    if not cond:
        raise ConfigError(msg)


@dataclass
class OptimConfigBase:
    """The optimizer keys every loop has, first in its ``optim`` section (a loop's section subclasses
    this, adds its own keys after these and may give these its own default)."""
    epochs: int = config_field(100, "training epochs")
    batch_size_per_gpu: int = config_field(64, "images per process (per GPU) and step")
    lr: float = config_field(5e-4, "peak learning rate at a global batch of 256; scaled linearly")
    min_lr: float = config_field(1e-6, "learning rate at the end of the cosine schedule")
    warmup_epochs: int = config_field(10, "epochs of the linear learning-rate warm-up")
    weight_decay: float = config_field(0.04, "weight decay")


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


class ConfigTree:
    """What every run's config is: a dataclass of sections (dataclasses of fields), every field name
    unique across its sections. Pretraining's (:class:`ssl_xcit.train.config.DinoConfig`) and fine-tuning's
    (:class:`ssl_xcit.finetune.config.FinetuneConfig`) are both built by :func:`load_config`."""

    PATH_KEYS: tuple[str, ...] = ()    # the keys that name files or folders (see :func:`pin_paths`)
    LOOP: str = ""                     # "module:function" of the loop that trains it (engine.launch.run_training)

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


def _section_classes(schema: type) -> dict[str, type]:
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def _field_index(schema: type) -> dict[str, str]:
    """Plain field name -> its section. Names are unique across sections by design."""
    index: dict[str, str] = {}
    for section, cls in _section_classes(schema).items():
        for f in dataclasses.fields(cls):
            if f.name in index:
                raise AssertionError(f"field {f.name} appears in two sections")
            index[f.name] = section
    return index


def config_fields(schema: type) -> list[tuple[str, dataclasses.Field, Any]]:
    """``(section, field, type)`` of every key, in section order: what command lines build their
    options and their help from (the type resolved from the annotation)."""
    out = []
    for section, cls in _section_classes(schema).items():
        hints = typing.get_type_hints(cls)
        out.extend((section, f, hints[f.name]) for f in dataclasses.fields(cls))
    return out


def _all_keys(schema: type) -> list[str]:
    index = _field_index(schema)
    return [f"{s}.{k}" for k, s in index.items()] + list(index)


def _unknown_key(key: str, schema: type) -> ConfigError:
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


def user_set_keys(cfg: ConfigTree) -> set[str]:
    """``section.name`` of every value set by a config file or an override (not a default). Kept
    beside the dataclass fields, so ``to_dict`` and checkpoints stay as they were."""
    return cfg.__dict__.setdefault("_user_set", set())


def user_values(cfg: ConfigTree) -> dict[str, dict[str, Any]]:
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


def config_from_dict(data: dict[str, Any], cfg: ConfigTree | None = None, schema: type | None = None) -> Any:
    """Apply a nested (``{optim: {lr: ..}}``) or flat (``{lr: ..}``) mapping onto a config (a new
    ``schema`` when none is given)."""
    cfg = cfg if cfg is not None else schema()  # type: ignore[misc]
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


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                schema: type) -> Any:
    """Build the config: defaults <- YAML file <- ``key=value`` overrides, then validate
    (``schema``: a loop's :class:`ConfigTree`, e.g. DINO's or fine-tuning's)."""
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



"""Training's command line speaks DINO's flags: ``--key value`` and ``--key=value`` beside ``key=value``.

Why a module of its own: the config layer knows its keys, not flag spellings. This module turns a
command line pasted from DINO (``main_dino.py --arch xcit_small_12_p16 --data_path /imagenet/train
--output_dir out --epochs 100``) into the ``key=value`` overrides the config layer reads, so that
``launch/train.py`` and torchrun build the config from the same words. Torch-free: ``--help`` and a
mistyped flag answer at once.

Every config key is a flag (``--lr 1e-3``, ``--lr=1e-3``, ``--optim.lr 1e-3``; dashes or
underscores). Pairs take two values (``--global_crops_scale 0.4 1.``); booleans take DINO's words
(``--norm_last_layer false``, also on/off, 1/0, yes/no) or stand alone for true. DINO's flags with
other names:

* ``--use_fp16 BOOL``: ``precision=fp16`` when true, ``fp32`` when false;
* ``--patch_size N``: XCiT names carry their patch (``xcit_small_12_p8``): the arch's patch must be
  N; an arch name without it (``--arch xcit_small_12 --patch_size 8``) gets it appended;
* ``--dist_url``, ``--local_rank`` / ``--local-rank``: accepted and ignored (torch.distributed.launch
  passes ``--local_rank=N``; the process group comes from the environment, as under torchrun).
"""
from __future__ import annotations

import argparse
import difflib
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from ssl_xcit.cli import FALSE_WORDS, TRUE_WORDS, UsageError, bool_word
from ssl_xcit.engine.config import ConfigError, config_fields
from ssl_xcit.train.config import DinoConfig

NULL_WORDS = ("null", "none", "auto")
IGNORED = {"dist_url": "URL", "local_rank": "N"}   # DINO's process-group flags: the environment decides
ALIASES = {"use_fp16": "BOOL", "patch_size": "N"}  # DINO's flags mapped onto keys of other names


@dataclass
class Translated:
    """A command line in the config layer's words: the recipe, the overrides in order, the help."""

    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    help: bool = False
    patch_size: int | None = None   # DINO's --patch_size, checked against the arch once it is known

    def argv(self) -> list[str]:
        """What the argparse parser of ``launch/train.py`` reads."""
        return [*(["--config", self.config] if self.config else []), *(["--help"] if self.help else []),
                *self.overrides]


def _keys(schema: type = DinoConfig) -> dict[str, tuple[str, Any, Any]]:
    """Flag name (plain and ``section.name``) -> (``section.name``, type, default)."""
    out: dict[str, tuple[str, Any, Any]] = {}
    for section, f, hint in config_fields(schema):
        out[f.name] = out[f"{section}.{f.name}"] = (f"{section}.{f.name}", hint, f.default)
    return out


def _bool_word(text: str, flag: str, nullable: bool = False) -> str:
    """A boolean flag's value (:func:`ssl_xcit.cli.bool_word`, or null) as YAML."""
    if nullable and text.strip().lower() in NULL_WORDS:
        return "null"
    try:
        return "true" if bool_word(text) else "false"
    except argparse.ArgumentTypeError as err:
        raise UsageError(f"{flag}: {err}{' or null' if nullable else ''}") from None


def _is_value(word: str) -> bool:
    """A word that can be a flag's value: not an option (a negative number is a value)."""
    return not word.startswith("-") or bool(re.fullmatch(r"-\d[\d.e+-]*", word))


def _yaml_quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class _Reader:
    """Walks the words once, keeping the order of overrides (a later word wins, as with key=value)."""

    def __init__(self, argv: list[str], prog: str, schema: type = DinoConfig) -> None:
        self.words, self.i, self.prog, self.keys = list(argv), 0, prog, _keys(schema)
        self.out = Translated()

    def error(self, message: str) -> UsageError:
        return UsageError(f"{message} (see {self.prog} --help)")

    def take(self, flag: str, inline: str | None, count: int = 1) -> list[str]:
        """The flag's values: its ``=value`` or the next ``count`` words."""
        if inline is not None:
            return [inline]
        values = self.words[self.i:self.i + count]
        if len(values) < count or not all(_is_value(v) for v in values):
            raise self.error(f"{flag} needs {count} value{'s' if count > 1 else ''}")
        self.i += count
        return values

    def optional_bool(self, flag: str, inline: str | None, nullable: bool = False) -> str:
        """A boolean flag's value: ``=word``, the next word when it is one, else true."""
        if inline is not None:
            return _bool_word(inline, flag, nullable)
        nxt = self.words[self.i] if self.i < len(self.words) else ""
        words = TRUE_WORDS + FALSE_WORDS + (NULL_WORDS if nullable else ())
        if nxt.lower() in words:
            self.i += 1
            return _bool_word(nxt, flag, nullable)
        if nxt and not nxt.startswith("-") and "=" not in nxt:   # not an override, not a flag: a bad value
            self.i += 1
            return _bool_word(nxt, flag, nullable)
        return "true"

    def key_value(self, flag: str, name: str, inline: str | None) -> str:
        """``section.name=yaml`` of a config key's flag."""
        key, hint, default = self.keys[name]
        args = typing.get_args(hint)
        if typing.get_origin(hint) is tuple:
            values = self.take(flag, inline, len(args))
            if inline is not None and inline.lstrip().startswith("["):
                return f"{key}={inline}"
            if inline is not None:
                values = inline.replace(",", " ").split()
            if len(values) != len(args):
                raise self.error(f"{flag} takes {len(args)} numbers (e.g. {flag} {_shown(default)})")
            return f"{key}=[{', '.join(values)}]"
        if hint is bool or (type(None) in args and bool in args):
            return f"{key}={self.optional_bool(flag, inline, nullable=type(None) in args)}"
        value = self.take(flag, inline)[0]
        return f"{key}={_yaml_quote(value) if hint is str else value}"

    def option(self, word: str) -> None:
        flag, eq, inline = word.partition("=")
        value = inline if eq else None
        name = flag.lstrip("-").replace("-", "_")
        if name in ("config",):
            self.out.config = self.take(flag, value)[0]
        elif name in ("h", "help"):
            self.out.help = True
        elif name in IGNORED:
            self.take(flag, value)
        elif name == "use_fp16":
            self.out.overrides.append("run.precision=" + ("fp16" if self.optional_bool(flag, value) == "true"
                                                          else "fp32"))
        elif name == "patch_size":
            text = self.take(flag, value)[0]
            if not text.isdigit():
                raise self.error(f"{flag} takes a whole number (8 or 16), got {text!r}")
            self.out.patch_size = int(text)
        elif name in self.keys:
            self.out.overrides.append(self.key_value(flag, name, value))
        else:
            known = ["--config", "--help", *(f"--{k}" for k in self.keys), *(f"--{k}" for k in (*IGNORED, *ALIASES))]
            close = difflib.get_close_matches(flag.replace("-", "_").replace("__", "--", 1), known, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise self.error(f"unknown option {flag}{hint}")

    def read(self) -> Translated:
        while self.i < len(self.words):
            word = self.words[self.i]
            self.i += 1
            if word == "--":
                self.out.overrides.extend(self.words[self.i:])
                break
            if word.startswith("-") and len(word) > 1:
                self.option(word)
            else:
                self.out.overrides.append(word)
        return self.out


def translate(argv: list[str], prog: str = "launch/train.py", schema: type = DinoConfig) -> Translated:
    """DINO-style and ``key=value`` words -> :class:`Translated` (recipe, overrides in order, help);
    ``schema``: the config whose keys are flags (pretraining's, or fine-tuning's)."""
    out = _Reader(argv, prog, schema).read()
    if out.patch_size is not None:
        _append_patch(out)
    return out


def _append_patch(out: Translated) -> None:
    """``--arch xcit_small_12 --patch_size 8`` -> ``arch=xcit_small_12_p8`` (the last arch word; a patch
    that differs from the arch's is reported by :func:`check_patch_size`, whatever set the arch)."""
    from ssl_xcit.models.zoo import arch_with_patch   # the name table: no torch
    for i in range(len(out.overrides) - 1, -1, -1):
        key, _, raw = out.overrides[i].partition("=")
        if key.lstrip("-") in ("arch", "model.arch"):
            name = raw.strip("'\"")
            try:
                out.overrides[i] = f"model.arch={_yaml_quote(arch_with_patch(name, out.patch_size))}"
            except ValueError:
                pass
            return


def check_patch_size(cfg: DinoConfig, patch_size: int | None) -> None:
    """DINO's ``--patch_size`` against the arch the config ended with (from the recipe, a flag or
    the default)."""
    from ssl_xcit.models.zoo import arch_with_patch
    if patch_size is not None:
        try:
            arch_with_patch(cfg.model.arch, patch_size)
        except ValueError as err:
            raise ConfigError(f"--patch_size {patch_size} does not match the arch: {err}") from None


# ------------------------------------------------------------------------------------------------ help
def _metavar(name: str, hint: Any) -> str | tuple[str, ...]:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return ("MIN", "MAX") if len(args) == 2 else tuple(f"P{i + 1}" for i in range(len(args)))
    if hint is bool:
        return "BOOL"
    if bool in args:
        return "BOOL|null"
    if hint is int:
        return "N"
    if hint is float:
        return "X"
    return "PATH" if name.endswith(("_path", "_dir")) else "TEXT"


def _shown(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value))
    return '""' if value == "" else str(value)


def add_config_options(parser: argparse.ArgumentParser, schema: type = DinoConfig) -> None:
    """One option per config key, grouped by section, each with its meaning and default: the help
    is generated from the config's fields. :func:`translate` reads these words before argparse."""
    fields = config_fields(schema)
    groups = {section: parser.add_argument_group(f"{section} (config section)")
              for section in dict.fromkeys(section for section, _, _ in fields)}
    for section, f, hint in fields:
        meta = _metavar(f.name, hint)
        text = f"{f.metadata.get('help', '')} (default: {_shown(f.default)})".replace("%", "%%")
        groups[section].add_argument(f"--{f.name}", metavar=meta, help=text, default=argparse.SUPPRESS,
                                     dest=f"_{section}_{f.name}", nargs=len(meta) if isinstance(meta, tuple) else None)
    dino = parser.add_argument_group("DINO's flags with other names")
    dino.add_argument("--use_fp16", metavar="BOOL", default=argparse.SUPPRESS,
                      help="DINO's mixed precision: true is precision=fp16, false precision=fp32")
    dino.add_argument("--patch_size", metavar="N", default=argparse.SUPPRESS,
                      help="must match the arch name's patch (xcit_small_12_p8); appended to an arch name without one")
    dino.add_argument("--dist_url", "--local_rank", metavar="X", default=argparse.SUPPRESS,
                      help="accepted and ignored: the process group comes from the environment (torchrun)")

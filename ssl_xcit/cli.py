"""Running a command line: a known error is one line on stderr and exit status 2, never a traceback.

Every script in ``launch/`` and ``eval/`` calls :func:`run` around its ``main``. Known errors are
:class:`ssl_xcit.errors.UserError` and the file-system errors a user causes (a missing file, a folder
where a file was expected, no permission, a full disk). Anything else is a bug: its traceback stays.
``--debug`` (anywhere on the command line, removed before ``main`` sees it) or ``SSL_XCIT_DEBUG=1``
shows the traceback of a known error too.

This module imports nothing heavy, so a script can answer ``--help`` and argument errors before
torch loads: pass ``main`` as a ``"module:function"`` string and it is imported only when needed.

>>> def main(argv):
...     raise FileNotFoundError(2, "No such file or directory", "runs/x/checkpoint.pth")
>>> run(main, ["--x"], prog="demo")  # doctest: +SKIP
demo: error: runs/x/checkpoint.pth: No such file or directory       (on stderr; exit status 2)
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from typing import Any, Callable, NoReturn, Sequence

from ssl_xcit.errors import UserError, fill

DEBUG_ENV = "SSL_XCIT_DEBUG"
USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130


def _debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    debug = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
        debug = True
    return debug, argv


def reword(err: BaseException, hints: dict[str, str] | None = None, flags: dict[str, str] | None = None) -> str:
    """``err``'s message as a command line says it: an error made by :func:`ssl_xcit.errors.hinted`
    loses the library's hint (a Python argument) and gets ``hints[err.needs]``, this command's own words
    for that setting, when it has one; an error made by :func:`ssl_xcit.errors.named` names the setting
    by this command's option, ``flags[err.setting]``, when it has one; any other error keeps its message."""
    setting, template = getattr(err, "setting", None), getattr(err, "template", None)
    if setting is not None and template is not None:
        return fill(template, getattr(err, "settings", (setting,)), flags) if setting in (flags or {}) else str(err)
    needs = getattr(err, "needs", None)
    if needs is None or getattr(err, "problem", None) is None:
        return str(err)
    own = (hints or {}).get(needs)
    return f"{err.problem}; {own}" if own else err.problem


def own_words(err: BaseException, hints: dict[str, str] | None, flags: dict[str, str] | None = None) -> BaseException:
    """``err`` itself, its message now in this command's words (:func:`reword`); for a command layer
    that re-raises a library error (``ssl_xcit.commands.options.run_tool``)."""
    if getattr(err, "setting", None) is not None and getattr(err, "template", None) is not None:
        err.args = (reword(err, hints, flags),)
        err.setting = err.template = None
    elif getattr(err, "needs", None) is not None and getattr(err, "problem", None) is not None:
        err.args = (reword(err, hints),)
        err.problem = err.needs = None
    return err


def flags_of(parser: argparse.ArgumentParser) -> dict[str, str]:
    """A parser's options by the Python name they fill (``dest`` -> its first spelling, e.g.
    ``crop_size`` -> ``--crop-size``): its words for a library error about that parameter
    (:func:`ssl_xcit.errors.named`)."""
    return {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"}


def describe(err: BaseException, hints: dict[str, str] | None = None,
             flags: dict[str, str] | None = None) -> str | None:
    """The one-line message for a known error, or ``None`` when ``err`` is a bug to show in full.
    ``hints``, ``flags``: the command's words for the settings a library error may name (:func:`reword`)."""
    if isinstance(err, UserError):  # one line even when the message quotes a multi-line library error
        return "; ".join(line.strip() for line in reword(err, hints, flags).splitlines() if line.strip())
    if isinstance(err, OSError):
        where = err.filename if err.filename is not None else None
        if err.errno == errno.ENOSPC:
            return f"no space left on the device writing {where}" if where else "no space left on the device"
        if isinstance(err, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
                            FileExistsError)) or err.errno == errno.EROFS:
            reason = err.strerror or type(err).__name__
            return f"{where}: {reason}" if where else str(err)
    return None


def run(main: Callable[[list[str]], Any] | str, argv: Sequence[str] | None = None, prog: str | None = None,
        hints: dict[str, str] | None = None, flags: dict[str, str] | None = None) -> Any:
    """Call ``main(argv)``; turn a known error into one line on stderr and ``SystemExit(2)``.

    ``hints``: this command's own words for a setting a library error needs (role -> text, e.g.
    ``{"allow_pickle": "pass --allow-pickle"}``); a library hint the command has no words for is left out.
    ``flags``: this command's option for a Python parameter a library error names (``{"crop_size":
    "--crop-size"}``, :func:`flags_of`).

    ``main`` may be ``"package.module:function"``, imported here, so that heavy imports happen
    after the command line has been checked by a light parser if the module is written that way.
    Returns what ``main`` returns (scripts may ``sys.exit`` with it when it is an int).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0] or "ssl_xcit")
    debug, argv = _debug_requested(argv)
    try:
        if isinstance(main, str):
            module, _, name = main.partition(":")
            main = getattr(importlib.import_module(module), name or "main")
        return main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(INTERRUPTED_EXIT) from None
    except Exception as err:  # noqa: BLE001 - sorted into known errors (one line) and bugs (re-raised)
        message = describe(err, hints, flags)
        if message is None or debug:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT) from None


def command_name(default: str) -> str:
    """The name the user typed: an installed ``ssl-xcit-*`` command's own, else ``default`` (the
    script's, e.g. ``launch/submit.py``), for usage lines and one-line errors."""
    name = os.path.basename(sys.argv[0] or "")
    return name if name.startswith("ssl-xcit") else default


TRUE_WORDS = ("true", "on", "1", "yes")     # DINO's utils.bool_flag, plus yes/no
FALSE_WORDS = ("false", "off", "0", "no")


def bool_word(text: str) -> bool:
    """A boolean flag's value as DINO's command lines spell it (``--use_cuda false``, ``on``, ``1``);
    an argparse ``type``."""
    low = str(text).strip().lower()
    if low in TRUE_WORDS or low in FALSE_WORDS:
        return low in TRUE_WORDS
    raise argparse.ArgumentTypeError(f"expected {'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)}, got {text!r}")


class UsageError(UserError):
    """A command line that does not parse (unknown option, missing or malformed value)."""


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` with each option's default said once: "(default: X)" is appended unless the help
    text already speaks of its default, or there is nothing to say (no default, a plain flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default in (None, False, argparse.SUPPRESS)
                or action.nargs == 0):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})".strip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse for this project's command lines: a usage mistake raises :class:`UsageError`, which
    :func:`run` prints as one line (exit status 2) instead of the usage block; defaults show once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")

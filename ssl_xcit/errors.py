"""The one base class of the errors a user can fix (bad input, a missing or foreign file, a
refused resume). Command lines print such an error as one line and exit with status 2
(:mod:`ssl_xcit.cli`); anything else is a bug and keeps its traceback.

This module imports nothing, so every layer (models, data, dino, train, evaluate) can raise it.
"""
from __future__ import annotations


class UserError(Exception):
    """An error whose message alone tells the user what to change. Subclass it (alongside a
    builtin such as ``ValueError`` where callers already catch that) for each kind of error."""


def hinted(error_type: type, problem: str, hint: str, needs: str) -> UserError:
    """``error_type(f"{problem}; {hint}")`` that keeps its parts, for an error a setting gets past.

    Library code says what a Python caller would pass (``hint``: "pass allow_pickle=True") and the
    role of that setting (``needs``: "allow_pickle"); a command line prints ``problem`` with its own
    option for that role, or with none when it has no such option (:func:`ssl_xcit.cli.describe`), so
    a hint never names a setting the user cannot type into the command that shows it.
    """
    err = error_type(f"{problem}; {hint}")
    err.problem, err.hint, err.needs = problem, hint, needs
    return err


SETTING = "{setting}"


def fill(template: str, settings: tuple[str, ...], words: dict[str, str] | None = None) -> str:
    """``template`` with each setting's word (``words[name]``, else its Python name) in its place:
    :data:`SETTING` for the first, ``{name}`` for the others."""
    words = words or {}
    text = template.replace(SETTING, words.get(settings[0], settings[0]))
    for name in settings[1:]:
        text = text.replace("{" + name + "}", words.get(name, name))
    return text


def named(error_type: type, message: str, setting: str, *others: str) -> UserError:
    """``error_type(message)`` about a setting, where :data:`SETTING` in ``message`` stands for it
    (and ``{name}`` for each of ``others``, when a message is about two).

    Library code names the Python parameter (``setting``: "crop_size 40 is not divisible by ...");
    a command line puts its own option there instead (:func:`ssl_xcit.cli.reword` with ``flags``:
    "--crop-size 40 is not divisible by ..."), so each layer speaks its caller's words. Build
    ``message`` with ``{{setting}}`` in an f-string (or with :data:`SETTING`).
    """
    settings = (setting, *others)
    err = error_type(fill(message, settings))
    err.template, err.setting, err.settings = message, setting, settings
    return err

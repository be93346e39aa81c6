"""The console commands of an installed ssl_xcit (``pip install .``): the ``launch/`` and ``eval/``
scripts without a checkout, each named in ``[project.scripts]`` of ``pyproject.toml``.

Every evaluation tool of :data:`ssl_xcit.commands.options.TOOLS` is a function of this module under
its own name (``eval_knn``, ``eval_linear``, ``export_features``, ...), so a tool registered there
becomes a command with one line in ``pyproject.toml`` (``ssl-xcit-NAME = "ssl_xcit.console:TOOL"``).
A command names itself in its help and errors; a known error is one line and exit status 2.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, NoReturn

from ssl_xcit import cli


def _exit(status: Any) -> NoReturn:
    """A command's ``main`` returns an exit status (int) or a result (dict, path): 0 for the latter."""
    sys.exit(status if isinstance(status, int) else 0)


def _run(target: str, default: str) -> NoReturn:
    """Run ``module:main`` (which takes ``argv`` and ``prog``) as the command ``default``."""
    import importlib
    module, name = target.split(":")
    main = getattr(importlib.import_module(module), name)
    prog = cli.command_name(default)
    _exit(cli.run(lambda argv: main(argv, prog=prog), prog=prog))


def train() -> NoReturn:
    _run("ssl_xcit.commands.train:main", "ssl-xcit-train")


def finetune() -> NoReturn:
    _run("ssl_xcit.commands.train:finetune_main", "ssl-xcit-finetune")


def quickstart() -> NoReturn:
    _run("ssl_xcit.commands.quickstart:main", "ssl-xcit-quickstart")


def publish() -> NoReturn:
    _run("ssl_xcit.commands.publish:main", "ssl-xcit-publish")


def search() -> NoReturn:
    _run("ssl_xcit.commands.search:main", "ssl-xcit-search")


def find_duplicates() -> NoReturn:
    _run("ssl_xcit.commands.find_duplicates:main", "ssl-xcit-find-duplicates")


def copy_detection() -> NoReturn:
    _run("ssl_xcit.commands.copy_detection:main", "ssl-xcit-copy-detection")


def image_retrieval() -> NoReturn:
    _run("ssl_xcit.commands.image_retrieval:main", "ssl-xcit-image-retrieval")


def video_segmentation() -> NoReturn:
    _run("ssl_xcit.commands.video_segmentation:main", "ssl-xcit-video-segmentation")


def segmentation() -> NoReturn:
    _run("ssl_xcit.commands.segmentation:main", "ssl-xcit-segmentation")


def submit() -> NoReturn:
    from ssl_xcit.commands.submit import main
    _exit(main())


def _tool(name: str) -> Callable[[], NoReturn]:
    def command() -> NoReturn:
        from ssl_xcit.commands.options import run_tool
        prog = cli.command_name(f"ssl-xcit-{name}")
        _exit(cli.run(lambda argv: run_tool(name, argv, prog=prog), prog=prog))
    command.__name__ = name
    return command


def __getattr__(name: str) -> Any:
    from ssl_xcit.commands.options import TOOLS   # torch-free
    if name in TOOLS:
        return _tool(name)
    raise AttributeError(f"module 'ssl_xcit.console' has no command {name!r}")

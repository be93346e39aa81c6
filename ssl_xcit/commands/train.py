"""The training entry point shared by ``launch/train.py``, ``launch/finetune.py``, torchrun and the
SLURM launcher: one way to read a command line into a config (:func:`parse_config`), one way to run
it (:func:`run_training`), whatever is trained (a :class:`Command`: DINO pretraining or fine-tuning).

Light on import: the parser and the config (YAML only) load without torch, so ``--help`` and config
errors answer at once; torch and the loop load only once the config is valid.

Outside SLURM, SIGTERM, SIGUSR2 and Ctrl-C stop the run at the next step boundary with a saved
checkpoint; the process then exits with status 128 + the signal number (143, 140, 130), so that a
shell or a scheduler sees an unfinished run, and running the same command again resumes it. A
second Ctrl-C quits at once without saving. (SLURM jobs handle their signals in
:class:`ssl_xcit.cluster.tasks.TrainTask`, which also requeues.)
"""
from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ssl_xcit.cli import ArgumentParser
from ssl_xcit.finetune.config import FinetuneConfig
from ssl_xcit.commands import flags
from ssl_xcit.engine.config import find_recipe, load_config
from ssl_xcit.engine.launch import run_training
from ssl_xcit.ranks import is_rank0
from ssl_xcit.train.config import DinoConfig

if TYPE_CHECKING:
    from ssl_xcit.engine.run import TrainResult

_COMMON = ("Runs alone, or under torchrun for several GPUs/nodes; resumes from the checkpoint in output_dir "
           "when there is one. SIGTERM, SIGUSR2, SIGHUP or Ctrl-C save a checkpoint at the next step and exit "
           "with status 128 + signal number (Ctrl-C twice: at once, unsaved). Every config key below is also a "
           "key=value override (lr=1e-3, optim.lr=1e-3) and takes DINO's spellings (--lr 1e-3, --lr=1e-3); a "
           "later word wins. Known errors: one line, exit status 2 (--debug shows the traceback).")


@dataclass(frozen=True)
class Command:
    """A training command line: its config (whose ``LOOP`` trains it), default name and help."""
    schema: type
    prog: str
    what: str
    example: str


PRETRAIN = Command(DinoConfig, "launch/train.py", "DINO pretraining of an XCiT on a folder of images (no labels "
                   "needed).", "--config configs/quickstart.yaml data_path=../shared/data/cifar10.tar.gz "
                   "output_dir=runs/quick epochs=2 | {prog} --arch xcit_small_12_p16 --data_path /imagenet/train "
                   "--output_dir out --epochs 100 (DINO's command line)")
FINETUNE = Command(FinetuneConfig, "launch/finetune.py", "Supervised fine-tuning of an XCiT (from any checkpoint "
                   "load_backbone reads: pretrained_weights=FILE, or random weights) on labelled train/ and val/ "
                   "class folders, with DeiT's recipe from timm.", "pretrained_weights=runs/quickstart/train/"
                   "checkpoint.pth data_path=../shared/data/cifar10.tar.gz output_dir=runs/ft epochs=10")


def command_of(cfg: Any) -> Command:
    return FINETUNE if isinstance(cfg, FinetuneConfig) else PRETRAIN


def build_parser(prog: str | None = None, command: Command = PRETRAIN) -> argparse.ArgumentParser:
    """The command line's help: ``--config``, ``key=value`` overrides and one ``--key`` option per
    config key with its meaning and default (:func:`ssl_xcit.commands.flags.add_config_options`)."""
    prog = prog or command.prog
    parser = ArgumentParser(
        prog=prog, usage=f"{prog} [-h] [--config RECIPE] [--KEY VALUE ...] [key=value ...]",
        description=f"{command.what} {_COMMON}", epilog=f"examples: {prog} {command.example.format(prog=prog)}")
    parser.add_argument("--config", help="YAML recipe: a file, or a packaged recipe by name (quickstart, "
                                         "dino_xcit_small_12_p16, finetune_xcit_small_12_p16, ...)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. lr=1e-3 optim.epochs=10")
    flags.add_config_options(parser, command.schema)
    return parser


def parse_config(argv: list[str], prog: str | None = None, command: Command = PRETRAIN) -> Any:
    """The run's config from a command line in either spelling (``key=value`` or DINO's flags)."""
    prog = prog or command.prog
    words = flags.translate(argv, prog, command.schema)
    args = build_parser(prog, command).parse_args(words.argv())
    cfg = load_config(find_recipe(args.config) if args.config else None, args.overrides, schema=command.schema)
    flags.check_patch_size(cfg, words.patch_size)
    return cfg


def finetune_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``launch/finetune.py``: :func:`main` with fine-tuning's config and loop."""
    return main(argv, prog, FINETUNE)


def main(argv: list[str] | None = None, prog: str | None = None, command: Command = PRETRAIN) -> int:
    """Parse, load the config, train; returns the exit status (0 finished, 128 + signum stopped).

    Known errors (a bad config, a refused resume, unreadable data) raise
    :class:`ssl_xcit.errors.UserError`; :func:`ssl_xcit.cli.run` prints them as one line.
    """
    prog = prog or command.prog
    cfg = parse_config(list(sys.argv[1:] if argv is None else argv), prog, command)
    from ssl_xcit.engine.signals import StopSignals

    main_rank = is_rank0()
    quiet: Callable[[str], None] = lambda _msg: None   # noqa: E731
    signals = StopSignals(log=(lambda msg: print(msg, flush=True)) if main_rank else quiet, plain=True)
    signals.install(interrupt=True)
    try:
        result = run_training(cfg, stop_requested=signals.stop_requested)
    finally:
        signals.restore()
    if result.status != "stopped":
        return 0
    signum = signals.signums[0] if signals.signums else signal.SIGTERM
    if main_rank:
        print(f"{prog}: stopped on {signal.Signals(signum).name}: {result.checkpoint} holds global "
              f"step {result.global_step}; run the same command to resume", file=sys.stderr, flush=True)
    return 128 + int(signum)

"""``launch/submit.py``: send training, fine-tuning or an evaluation tool to SLURM (or submitit's
local executor).

    python launch/submit.py --config configs/X.yaml [key=value | --key value ...] --nodes 2 --gpus-per-node 8 ...
    python launch/submit.py [launcher options] finetune pretrained_weights=FILE data_path=DIR ...
    python launch/submit.py [launcher options] eval_knn --checkpoint ... --data-path ...

Training's words are ``launch/train.py``'s, read by the same code (:func:`ssl_xcit.commands.train.parse_config`:
recipes by name, ``key=value``, DINO's ``--key value``), mixed with the launcher's options; a tool's
(``finetune``: ``launch/finetune.py``'s; an evaluation tool's) come after its name. Everything that
can be wrong with the input is checked before anything is submitted, and reported as one line with
exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from submitit.core.utils import FailedJobError

from ssl_xcit import cli
from ssl_xcit.cluster.executor import (CLUSTERS, JobSpec, SubmitError, check_partition, choose_cluster,
                                       make_executor, render_sbatch, reword_sbatch_error)
from ssl_xcit.cluster.tasks import EvalTask, TrainTask
from ssl_xcit.commands import options as eval_options

# evaluation tools the launcher submits: name on the command line -> module with main(argv)
EVAL_TOOLS = {name: module for name, (module, _parser, _checks) in eval_options.TOOLS.items()}

PROG = cli.command_name("launch/submit.py")   # ssl-xcit-submit when installed and run as it


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog=PROG, allow_abbrev=False,
        usage=f"{PROG} [launcher options] [--config RECIPE] [key=value | --KEY VALUE ...]   (training)\n"
              f"       {PROG} [launcher options] finetune|TOOL [its arguments]",
        description="Submit DINO training, fine-tuning or an evaluation tool as a SLURM job through submitit: "
                    "one task per GPU, torch.distributed set up from SLURM, checkpoint and requeue on the "
                    "time-limit/preemption signal, resume on restart. Training takes launch/train.py's words "
                    "(launch/train.py --help lists every key); fine-tuning launch/finetune.py's after the word "
                    "finetune.",
        epilog="tools: finetune, " + ", ".join(EVAL_TOOLS) + ". Put launcher options first: "
               "launch/submit.py --nodes 1 --gpus-per-node 8 eval_knn --checkpoint ckpt.pth --data-path DIR")
    g = p.add_argument_group("resources")
    g.add_argument("--cluster", default="auto", choices=CLUSTERS,
                   help="auto: SLURM when sbatch/srun are installed, else the local executor")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", "--ngpus", type=int, default=0,
                   help="one task per GPU (0: a CPU job); --ngpus is DINO's run_with_submitit.py name")
    g.add_argument("--tasks-per-node", type=int, default=None,
                   help="tasks per node for CPU jobs (default: --gpus-per-node, or 1)")
    g.add_argument("--cpus-per-task", type=int, default=None)
    g.add_argument("--mem-per-gpu", default=None, help="e.g. 40G")
    g.add_argument("--timeout", type=int, default=1440, help="time limit in minutes (default 1440)")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint")
    g.add_argument("--use_volta32", action="store_const", const="volta32gb", dest="constraint",
                   help="DINO's run_with_submitit.py flag: --constraint volta32gb")
    g.add_argument("--comment")
    g.add_argument("--job-name", default=None)
    g.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="extra sbatch option, repeatable (e.g. --slurm exclusive --slurm mail-type=END)")
    r = p.add_argument_group("requeue and bookkeeping")
    r.add_argument("--max-requeues", type=int, default=20,
                   help="requeues allowed after time-limit/preemption signals (default 20)")
    r.add_argument("--signal-delay", type=int, default=90,
                   help="seconds before the time limit at which SLURM sends the checkpoint signal")
    r.add_argument("--job-dir", default=None,
                   help="submitit folder for scripts, pickles and logs (default: <output_dir>/slurm; for "
                        "a tool, <its --output-dir>/slurm, else runs/slurm/<tool>)")
    r.add_argument("--dry-run", action="store_true", help="print the sbatch script and submit nothing")
    r.add_argument("--wait", action="store_true", help="wait for the job to end and report its outcome")
    return p


# the launcher's options, taking a value or not; every other word is training's (or a tool's)
_VALUE_OPTIONS = {a for act in build_parser()._actions if act.option_strings and act.nargs != 0
                  for a in act.option_strings} - {"-h", "--help"}
_FLAG_OPTIONS = {a for act in build_parser()._actions if act.option_strings and act.nargs == 0
                 for a in act.option_strings}


# the tools: fine-tuning (a training command line, saved and requeued like pretraining) and the evaluation tools
TOOL_NAMES = ("finetune", *EVAL_TOOLS)


def split_tool(argv: list[str]) -> tuple[list[str], str | None, list[str]]:
    """(launcher and training words, tool name or None, the tool's own words)."""
    for i, word in enumerate(argv):
        if word in TOOL_NAMES and not (i > 0 and _takes_next(argv[i - 1])):
            return argv[:i], word, argv[i + 1:]
    return argv, None, []


def _takes_next(word: str) -> bool:
    """Whether ``word`` is an option whose value is the next word: not a launcher's on/off flag
    (``--dry-run finetune ...``: the tool), not ``--name=value``."""
    return word.startswith("-") and "=" not in word and word not in _FLAG_OPTIONS


def split_launcher(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the launcher's options with their values, everything else in order: training's words)."""
    mine, rest, i = [], [], 0
    while i < len(argv):
        word = argv[i]
        name = word.split("=", 1)[0]
        if name in _VALUE_OPTIONS or name in _FLAG_OPTIONS:
            takes = name in _VALUE_OPTIONS and "=" not in word and i + 1 < len(argv)
            mine += argv[i:i + 1 + takes]
            i += 1 + takes
        else:
            rest.append(word)
            i += 1
    return mine, rest


def check_no_unknown_tool(argv: list[str]) -> None:
    """A bare word among training's words that is no option's value is a misspelt tool (or a recipe
    without --config): name it, and the closest tool, instead of failing later on a misleading
    config error."""
    for i, word in enumerate(argv):
        if word.startswith("-") or "=" in word or (i > 0 and _takes_next(argv[i - 1])):
            continue
        close = difflib.get_close_matches(word, list(TOOL_NAMES), n=1, cutoff=0.6)
        hint = (f"did you mean '{close[0]}'?" if close else
                f"known tools: {', '.join(TOOL_NAMES)} (training: --config X.yaml [key=value ...])")
        raise SubmitError(f"unknown tool '{word}'; {hint}")


def parse_slurm_extras(items: list[str]) -> dict[str, Any]:
    """``--slurm key=value`` (or a bare ``key`` for a flag) -> sbatch options for submitit."""
    extras: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise SubmitError(f"--slurm {item!r}: expected KEY=VALUE or KEY (an sbatch option name)")
        extras[key.replace("_", "-")] = value if sep else True
    return extras


def job_spec(args: argparse.Namespace, default_name: str) -> JobSpec:
    tasks = args.tasks_per_node if args.tasks_per_node is not None else max(1, args.gpus_per_node)
    return JobSpec(nodes=args.nodes, tasks_per_node=tasks, gpus_per_node=args.gpus_per_node,
                   cpus_per_task=args.cpus_per_task, timeout_min=args.timeout, partition=args.partition,
                   account=args.account, qos=args.qos, constraint=args.constraint, comment=args.comment,
                   mem_per_gpu=args.mem_per_gpu, job_name=args.job_name or default_name,
                   signal_delay_s=args.signal_delay, max_requeues=args.max_requeues,
                   additional=parse_slurm_extras(args.slurm))


@dataclass
class Prepared:
    """Everything decided before submitting: what to run, where, with which resources."""

    task: Any
    spec: JobSpec
    job_dir: Path
    description: str       # what runs, for the printed summary


def prepare_training(args: argparse.Namespace, words: list[str], tool: str | None = None,
                     train_fn: Callable[..., Any] | None = None) -> Prepared:
    """The job of a training command line (``tool``: None for pretraining, ``finetune``), its words
    read exactly as ``launch/train.py`` / ``launch/finetune.py`` read them."""
    from ssl_xcit.engine.config import ConfigError, user_values
    from ssl_xcit.commands.train import FINETUNE, PRETRAIN, parse_config

    command = FINETUNE if tool == "finetune" else PRETRAIN
    try:
        cfg = parse_config(words, f"{PROG} {tool}" if tool else PROG, command)
    except ConfigError as err:
        raise SubmitError(f"config error: {err}") from None
    if not cfg.data.data_path:
        raise SubmitError("config error: data_path is not set (set it in the YAML or add data_path=...)")
    if not _data_path_exists(cfg.data.data_path):
        raise SubmitError(f"config error: data_path {cfg.data.data_path} does not exist on this machine")
    arch = _arch_to_train(cfg)
    output_dir = Path(cfg.run.output_dir)   # load_config made the paths absolute: the job may start elsewhere
    job_dir = Path(args.job_dir).expanduser().resolve() if args.job_dir else output_dir / "slurm"
    kind = tool or "dino"
    spec = job_spec(args, default_name=f"{kind}_{output_dir.name}")
    # what the user set, not the resolved values: the job rebuilds the config as launch/train.py
    # does, so recipe=auto chooses there exactly what it would choose here
    task = TrainTask(config=user_values(cfg), kind=kind, max_requeues=spec.max_requeues, train_fn=train_fn,
                     max_requeues_name="--max-requeues")
    what = "fine-tuning" if tool else "training"
    return Prepared(task, spec, job_dir, f"{what} {arch} into {output_dir}")


def _arch_to_train(cfg: Any) -> str:
    """The arch the job will build: with ``pretrained_weights`` and no ``arch``, the file's (as the run
    takes it). The file is checked here, like ``data_path``: a job that waits in the queue for hours
    must not fail at its first second on a missing or unreadable file, or on a wrong ``arch``."""
    from ssl_xcit.errors import UserError
    from ssl_xcit.train.config import user_set_keys
    from ssl_xcit.train.pretrained import check_arch, read_pretrained
    path = cfg.model.pretrained_weights
    if not path:
        return cfg.model.arch
    if not Path(path).is_file():
        raise SubmitError(f"config error: pretrained_weights {path} does not exist on this machine")
    try:
        facts = read_pretrained(path).facts()
        if "model.arch" in user_set_keys(cfg):
            check_arch(facts, cfg.model.arch)
    except UserError as err:
        raise SubmitError(f"config error: {err}") from None
    return facts["arch"] if "model.arch" not in user_set_keys(cfg) else cfg.model.arch


def _data_path_exists(text: str) -> bool:
    """A folder or archive that exists, every shard of a comma list, or a brace pattern's folder."""
    if Path(text).exists():
        return True
    if "," in text:
        return all(Path(part).exists() for part in text.split(","))
    return "{" in text and Path(text).parent.is_dir()


def option_value(argv: list[str], name: str) -> str | None:
    """The value of ``name VALUE`` or ``name=VALUE`` in a tool's words (the last one wins, as in argparse)."""
    value = None
    for i, word in enumerate(argv):
        if word == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif word.startswith(name + "="):
            value = word.split("=", 1)[1]
    return value


def check_tool_args(tool: str, tool_argv: list[str]) -> None:
    """Parse the tool's words with its own (torch-free) parser now, so a typo fails here and not in
    the queue. Paths are not checked: they may exist only where the job runs.

    ``eval_knn --help`` prints the tool's help and exits 0.
    """
    _, make_parser, _ = eval_options.TOOLS[tool]
    parser = make_parser()
    parser.prog = f"{PROG} [options] {tool}"
    try:
        parser.parse_args(tool_argv)
    except cli.UsageError as err:
        raise SubmitError(f"{tool}: {err}") from None


def prepare_eval(args: argparse.Namespace, tool: str, tool_argv: list[str], words: list[str]) -> Prepared:
    if words:
        raise SubmitError(f"--config and key=value overrides are for training; {tool} takes its own "
                          f"arguments after its name (got {' '.join(words)})")
    check_tool_args(tool, tool_argv)
    tool_out = option_value(tool_argv, "--output-dir") or option_value(tool_argv, "--out")
    job_dir = Path(args.job_dir or (Path(tool_out) / "slurm" if tool_out else Path("runs", "slurm", tool)))
    job_dir = job_dir.expanduser().resolve()
    spec = job_spec(args, default_name=tool)
    return Prepared(EvalTask(tool, tool_argv, EVAL_TOOLS[tool]), spec, job_dir, f"{tool} {' '.join(tool_argv)}".strip())


def prepare(argv: list[str], train_fn: Callable[..., Any] | None = None) -> tuple[argparse.Namespace, Prepared]:
    launcher_argv, tool, tool_argv = split_tool(argv)
    launcher_argv, words = split_launcher(launcher_argv)
    args = build_parser().parse_args(launcher_argv)
    if tool is None:
        check_no_unknown_tool(words)
        if not words:
            raise SubmitError("nothing to run: give --config X.yaml [key=value ...] for training, or a tool "
                              f"({', '.join(TOOL_NAMES)}) followed by its arguments")
        return args, prepare_training(args, words, None, train_fn)
    if tool == "finetune":
        if words:
            raise SubmitError(f"{' '.join(words)}: put fine-tuning's words after 'finetune'")
        return args, prepare_training(args, tool_argv, tool, train_fn)
    return args, prepare_eval(args, tool, tool_argv, words)


def wait_for(job: Any) -> int:
    """Block until the job ends; 0 when every task returned, 1 otherwise."""
    while not job.done():
        time.sleep(5)
    err = job.exception()
    if err is not None:
        print(f"job {job.job_id} failed: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"job {job.job_id} ended: {job.results()[0]}")
    return 0


@dataclass
class Submitted:
    job: Any               # submitit Job (SlurmJob or LocalJob)
    cluster: str
    prepared: Prepared
    wait: bool             # --wait: main() blocks until the job ends


def submit(argv: list[str], *, train_fn: Callable[..., Any] | None = None) -> Submitted | None:
    """Check, submit and print where the logs go; None for ``--dry-run``.

    ``train_fn`` replaces ``run_training`` inside the job (tests, custom loops); it must follow the
    same contract (``stop_requested`` polled at step boundaries, a result with ``status``).
    """
    args, prep = prepare(argv, train_fn=train_fn)
    if args.dry_run:
        print(f"# dry run ({prep.description}): {prep.spec.num_tasks} task(s); job folder {prep.job_dir}")
        print(render_sbatch(prep.spec, prep.job_dir))
        return None
    cluster = choose_cluster(args.cluster)
    if cluster == "slurm":
        check_partition(prep.spec.partition)
    try:
        executor = make_executor(prep.spec, prep.job_dir, cluster)
    except OSError as err:
        raise SubmitError(f"cannot create the job folder {prep.job_dir}: {err.strerror}") from None
    try:
        with contextlib.redirect_stderr(io.StringIO()):   # submitit echoes sbatch's stderr: reworded below
            job = executor.submit(prep.task)
    except FailedJobError as err:
        raise SubmitError(reword_sbatch_error(err)) from None
    spec = prep.spec
    print(f"submitted job {job.job_id} ({cluster}): {prep.description}")
    print(f"  {spec.nodes} node(s) x {spec.tasks_per_node} task(s), {spec.gpus_per_node} GPU(s) per node, "
          f"time limit {spec.timeout_min} min, up to {spec.max_requeues} requeue(s)")
    print(f"  stdout: {job.paths.stdout}")
    print(f"  stderr: {job.paths.stderr}")
    print(f"  follow: tail -f {job.paths.stdout}", flush=True)
    return Submitted(job, cluster, prep, args.wait)


def _run(argv: list[str]) -> int:
    submitted = submit(argv)
    if submitted is not None and submitted.wait:
        return wait_for(submitted.job)
    return 0


# the launcher's option for each JobSpec field a library error names (ssl_xcit.errors.named); the
# parser's own where the names agree
FLAGS = {**cli.flags_of(build_parser()), "timeout_min": "--timeout", "signal_delay_s": "--signal-delay"}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: returns the exit status; a known error is one line on stderr and status 2
    (:func:`ssl_xcit.cli.run`: ``--debug`` shows its traceback)."""
    try:
        return cli.run(_run, argv, prog=PROG, flags=FLAGS)
    except SystemExit as stop:  # cli.run's status for a known error or ^C; argparse's 0 after --help
        return stop.code if isinstance(stop.code, int) else 1

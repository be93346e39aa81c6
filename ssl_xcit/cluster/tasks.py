"""The callables submitit pickles and runs in every task of a job: training and the evaluation tools."""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import submitit
from submitit.core.utils import DelayedSubmission

from ssl_xcit.cluster.environment import TaskInfo, export_torch_env
from ssl_xcit.cluster.stopping import StopRendezvous, decide, rendezvous_folder
from ssl_xcit.engine.signals import StopSignals

# exit status of a task whose job was requeued: it must end without a result file, or
# submitit's job.result() would read this run's partial result while the job runs again
REQUEUED_EXIT = 3


def _log(message: str) -> None:
    print(message, flush=True)


def _default_train(cfg: Any, stop_requested: Callable[[], bool]) -> Any:
    from ssl_xcit.engine.launch import run_training  # heavy import: only inside the job
    return run_training(cfg, stop_requested=stop_requested)


@dataclass
class TrainTask:
    """One training job: every task exports the torchrun variables and runs the training entry point.

    ``config`` is :func:`~ssl_xcit.train.config.user_values`: the values the user set, as plain
    data (so the pickle does not depend on the class layout); the job rebuilds the rest from the
    defaults and ``recipe: auto``, exactly as ``launch/train.py`` does with the same command. ``requeues_done`` travels in the job's pickle, which rank 0 rewrites before requeueing.
    ``train_fn`` replaces ``run_training`` (tests); it must accept ``(cfg, stop_requested=...)`` and
    return an object with ``status`` and ``checkpoint``.
    """

    config: dict[str, Any]
    kind: str = "dino"                # "dino" (pretraining) or "finetune": which config and loop
    max_requeues: int = 20
    max_requeues_name: str = "max_requeues"   # the submitter's word for the limit, said when it is reached
    requeues_done: int = 0
    gather_timeout_s: float = 60.0    # rank 0 waits this long for the other ranks to report
    train_fn: Callable[..., Any] | None = field(default=None, repr=False)

    def job_config(self) -> Any:
        """The run's config, rebuilt in the job from what the user set (defaults fill in the rest)."""
        from ssl_xcit.engine.config import config_from_dict
        from ssl_xcit.finetune.config import FinetuneConfig
        from ssl_xcit.train.config import DinoConfig
        schema = FinetuneConfig if self.kind == "finetune" else DinoConfig
        return config_from_dict(self.config, schema=schema).validate()

    def __call__(self) -> Any:
        task = export_torch_env()
        signals = StopSignals(log=_log if task.rank == 0 else (lambda _msg: None)).install(interrupt=True)
        cfg = self.job_config()
        if task.rank == 0:
            _log(f"[cluster] job {task.job_id} run {task.restart}: {task.world_size} task(s) on "
                 f"{task.num_nodes} node(s), rank 0 at {task.master_addr}:{task.master_port}; "
                 f"{self.requeues_done} requeue(s) so far (max {self.max_requeues})")
        train = self.train_fn or _default_train
        result = train(cfg, stop_requested=signals.stop_requested)
        if getattr(result, "status", None) != "stopped":
            return result
        return self._after_stop(task, signals, result)

    def _after_stop(self, task: TaskInfo, signals: StopSignals, result: Any) -> Any:
        job_env = submitit.JobEnvironment()
        folder = rendezvous_folder(job_env.paths.folder, task.run_id, self.requeues_done)
        rv = StopRendezvous(folder, task.rank, task.world_size)
        rv.report(signals.reasons)
        if task.rank != 0:
            decision = rv.wait_decision(timeout_s=self.gather_timeout_s + 120)
            if decision is not None and decision.requeue:
                raise SystemExit(REQUEUED_EXIT)
            return result
        reasons, missing = rv.gather(self.gather_timeout_s)
        reasons.update(signals.reasons)   # a signal that came while waiting still counts
        if missing:
            _log(f"[cluster] warning: rank(s) {missing} did not report within "
                 f"{self.gather_timeout_s:.0f}s; rank 0 saved the checkpoint, deciding without them")
        checkpoint = getattr(result, "checkpoint", None)
        decision = decide(reasons, self.requeues_done, self.max_requeues,
                          Path(checkpoint) if checkpoint else None, self.max_requeues_name)
        rv.publish(decision)
        _log(f"[cluster] {decision.message}")
        if not decision.requeue:
            return result
        self._requeue(job_env)
        raise SystemExit(REQUEUED_EXIT)

    def _requeue(self, job_env: submitit.JobEnvironment) -> None:
        """Rewrite the job's pickle with one more requeue counted, then requeue the job once."""
        from ssl_xcit.atomic import atomic_write  # imports torch: only inside jobs
        pickle_path = job_env.paths.submitted_pickle
        delayed = DelayedSubmission.load(pickle_path)
        delayed.function = dataclasses.replace(self, requeues_done=self.requeues_done + 1)
        atomic_write(pickle_path, delayed.dump)
        # SLURM: `scontrol requeue <job>`; local executor: exits with its requeue code
        job_env._requeue(delayed._timeout_countdown)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission | None:
        """submitit's own handler calls this only if the signal comes before ``__call__`` has
        installed ours (nothing trained yet): requeue unchanged, counting it, while allowed."""
        if self.requeues_done >= self.max_requeues:
            return None
        return DelayedSubmission(dataclasses.replace(self, requeues_done=self.requeues_done + 1))


class EvalTask(submitit.helpers.Checkpointable):
    """An evaluation tool's ``main(argv)`` in every task of a job.

    The tools have no step-boundary stop hook and are cheap to redo, so preemption uses submitit's
    own path (``Checkpointable``): on the warning signal rank 0 requeues the same call, which
    starts over.
    """

    def __init__(self, tool: str, argv: list[str], module: str) -> None:
        self.tool = tool              # the tool's name on the command line (eval_knn, ...)
        self.argv = list(argv)
        self.module = module          # the module whose main(argv) runs it (the submit command's choice)

    def __call__(self) -> Any:
        export_torch_env()
        module = importlib.import_module(self.module)
        return module.main(self.argv)


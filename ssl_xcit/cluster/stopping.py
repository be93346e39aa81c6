"""Stop-and-requeue: signals become a flag, ranks agree through files, rank 0 requeues once.

Why not submitit's own handler: it calls ``checkpoint()`` inside the signal handler on rank 0 only
and requeues at once, while the other ranks are in the middle of a step. Our training loop can only
save a consistent checkpoint at a step boundary that all ranks agree on (it all-reduces the flag),
and the job must be requeued only after that checkpoint is on disk. So here a signal only sets a
flag; after the loop has returned everywhere, each rank reports in a shared folder, and rank 0
alone decides and calls the requeue.
"""
from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import submitit

REQUEUE = "requeue"   # SLURM's warning signal (USR2 by default): time limit or preemption is near
TERMINATE = "term"    # SIGTERM: scancel, or a preemption SLURM itself handles; save, do not requeue
INTERRUPT = "interrupt"   # SIGINT (Ctrl-C) on a plain run: save and stop; a second one quits at once
HANGUP = "hangup"     # SIGHUP: the terminal of the run closed; save, do not requeue


def requeue_signal() -> signal.Signals:
    """The signal sbatch's ``--signal`` sends (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    name = "SIG" + submitit.JobEnvironment.USR_SIG
    sig = getattr(signal, name, None)
    if sig is None:
        raise ValueError(f"unknown signal {name} (from SUBMITIT_PREEMPT_SIGNAL)")
    return sig


class StopSignals:
    """Records the stop signals a task receives; ``stop_requested`` is what the loop polls.

    The handler does nothing but append to a list: printing from a handler can raise a
    reentrant-write error when the main thread is printing too. ``stop_requested`` logs the first
    signal instead, from the loop's thread.

    Every run installs the requeue signal, SIGTERM and SIGHUP (a closed terminal); with
    ``install(interrupt=True)`` (plain runs: ``launch/train.py``, torchrun, with ``plain=True``; and
    jobs) SIGINT (Ctrl-C) stops at the next step boundary too, and a second SIGINT raises
    ``KeyboardInterrupt`` at once (nothing saved). Data-loading workers ignore all of them
    (:func:`ssl_xcit.train.run.worker_ignores_stop_signals`): a signal sent to the whole process
    group is the main process's to act on.
    ``restore()`` puts back the handlers that were there before ``install``.
    """

    def __init__(self, log: Callable[[str], None] = print, plain: bool = False) -> None:
        self.received: list[tuple[str, float]] = []
        self.signums: list[int] = []
        self._log = log
        self._plain = plain
        self._announced = False
        self._previous: dict[int, object] = {}

    def install(self, interrupt: bool = False) -> "StopSignals":
        handlers = {requeue_signal(): self._on_requeue, signal.SIGTERM: self._on_term,
                    signal.SIGHUP: self._on_hangup}
        if interrupt:
            handlers[signal.SIGINT] = self._on_interrupt
        for sig, handler in handlers.items():
            self._previous[sig] = signal.signal(sig, handler)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _record(self, reason: str, signum: int) -> None:
        self.received.append((reason, time.time()))
        self.signums.append(signum)

    def _on_requeue(self, signum: int, frame: object) -> None:
        self._record(REQUEUE, signum)

    def _on_term(self, signum: int, frame: object) -> None:
        self._record(TERMINATE, signum)

    def _on_hangup(self, signum: int, frame: object) -> None:
        self._record(HANGUP, signum)

    def _on_interrupt(self, signum: int, frame: object) -> None:
        if INTERRUPT in self.reasons:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt   # the second Ctrl-C: quit now, without saving
        self._record(INTERRUPT, signum)

    @property
    def reasons(self) -> list[str]:
        return sorted({reason for reason, _ in self.received})

    def stop_requested(self) -> bool:
        if self.received and not self._announced:
            self._announced = True
            usr = f"SIG{submitit.JobEnvironment.USR_SIG}"
            if self._plain:
                names = {REQUEUE: usr, TERMINATE: "SIGTERM", HANGUP: "SIGHUP",
                         INTERRUPT: "SIGINT (Ctrl-C again quits at once, without saving)"}
                prefix = "[ssl_xcit]"
            else:
                names = {REQUEUE: f"{usr} (time limit or preemption)", TERMINATE: "SIGTERM (cancelled or preempted)",
                         HANGUP: "SIGHUP", INTERRUPT: "SIGINT"}
                prefix = "[cluster]"
            self._log(f"{prefix} caught {', '.join(names[r] for r in self.reasons)}: "
                      "stopping at this step boundary to save a checkpoint")
        return bool(self.received)


@dataclass(frozen=True)
class Decision:
    requeue: bool
    message: str


def decide(reasons: set[str], requeues_done: int, max_requeues: int,
           checkpoint: Path | None) -> Decision:
    """Requeue only for the warning signal, with a checkpoint on disk, while requeues are left."""
    where = f"checkpoint: {checkpoint}" if checkpoint else "no checkpoint was written"
    if REQUEUE not in reasons:
        names = {TERMINATE: "SIGTERM", HANGUP: "SIGHUP", INTERRUPT: "SIGINT"}
        got = ", ".join(names.get(r, r) for r in sorted(reasons)) or "SIGTERM"
        return Decision(False, f"stopped on {got}, not requeued ({where})")
    if checkpoint is None or not Path(checkpoint).is_file():
        return Decision(False, f"stopped but not requeued: {where}, a new run would start from scratch")
    if requeues_done >= max_requeues:
        return Decision(False, f"stopped and NOT requeued: --max-requeues={max_requeues} reached "
                               f"({requeues_done} requeues done); {where}; submit again with the same "
                               "output_dir to continue")
    return Decision(True, f"requeueing (requeue {requeues_done + 1} of at most {max_requeues}); {where}")


class StopRendezvous:
    """Files in a folder all tasks share (the submitit job folder), one folder per run of a job.

    Each rank writes ``rank<r>.json`` once its training function has returned; rank 0 waits for all
    of them and writes ``decision.json``, which the other ranks wait for.
    """

    def __init__(self, folder: Path, rank: int, world_size: int, poll_s: float = 0.2) -> None:
        self.folder = Path(folder)
        self.rank = rank
        self.world_size = world_size
        self.poll_s = poll_s

    def report(self, reasons: list[str]) -> None:
        from ssl_xcit.atomic import atomic_write_text  # imports torch: only inside jobs
        atomic_write_text(self.folder / f"rank{self.rank}.json", json.dumps({"reasons": reasons}))

    def gather(self, timeout_s: float) -> tuple[set[str], list[int]]:
        """Rank 0: the union of every rank's reasons, and the ranks that did not report in time."""
        deadline = time.monotonic() + timeout_s
        while True:
            missing = [r for r in range(self.world_size) if not (self.folder / f"rank{r}.json").exists()]
            if not missing or time.monotonic() >= deadline:
                break
            time.sleep(self.poll_s)
        reasons: set[str] = set()
        for r in range(self.world_size):
            path = self.folder / f"rank{r}.json"
            if path.exists():
                reasons.update(json.loads(path.read_text())["reasons"])
        return reasons, missing

    def publish(self, decision: Decision) -> None:
        from ssl_xcit.atomic import atomic_write_text
        atomic_write_text(self.folder / "decision.json",
                          json.dumps({"requeue": decision.requeue, "message": decision.message}))

    def wait_decision(self, timeout_s: float) -> Decision | None:
        path = self.folder / "decision.json"
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            if time.monotonic() >= deadline:
                return None
            time.sleep(self.poll_s)
        data = json.loads(path.read_text())
        return Decision(bool(data["requeue"]), str(data["message"]))


def rendezvous_folder(job_folder: Path, run_id: str, requeues_done: int) -> Path:
    """Unique per run: SLURM keeps the job id across requeues, the local executor also the restart count."""
    return Path(job_folder) / ".stops" / f"{run_id}.q{requeues_done}"


"""Stop signals become a flag the training loop polls once a step (:class:`StopSignals`).

Why a flag: a handler that saved or requeued at once would act in the middle of a step, while the
other ranks are elsewhere. The loop saves a consistent checkpoint at a step boundary that all ranks
agree on (:meth:`ssl_xcit.engine.run.Run.check_loss` all-reduces the flag); a plain run then exits
with 128 + the signal number, a SLURM job reports and requeues (:mod:`ssl_xcit.cluster.stopping`).
"""
from __future__ import annotations

import os
import signal
import time
from typing import Callable

REQUEUE = "requeue"   # SLURM's warning signal (USR2 by default): time limit or preemption is near
TERMINATE = "term"    # SIGTERM: scancel, or a preemption SLURM itself handles; save, do not requeue
INTERRUPT = "interrupt"   # SIGINT (Ctrl-C) on a plain run: save and stop; a second one quits at once
HANGUP = "hangup"     # SIGHUP: the terminal of the run closed; save, do not requeue


def requeue_signal() -> signal.Signals:
    """The signal sbatch's ``--signal`` sends (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise,
    read as submitit's ``JobEnvironment.USR_SIG`` reads it)."""
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
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
    (:func:`ssl_xcit.engine.run.worker_ignores_stop_signals`): a signal sent to the whole process
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
            usr = requeue_signal().name
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

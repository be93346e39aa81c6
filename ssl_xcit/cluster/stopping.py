"""Stop-and-requeue: signals become a flag (:mod:`ssl_xcit.engine.signals`), ranks agree through
files, rank 0 requeues once.

Why not submitit's own handler: it calls ``checkpoint()`` inside the signal handler on rank 0 only
and requeues at once, while the other ranks are in the middle of a step. Our training loop can only
save a consistent checkpoint at a step boundary that all ranks agree on (it all-reduces the flag),
and the job must be requeued only after that checkpoint is on disk. So here a signal only sets a
flag; after the loop has returned everywhere, each rank reports in a shared folder, and rank 0
alone decides and calls the requeue.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

# the signal flags live with the training entry point, which plain runs use too (train/ imports
# nothing of cluster/); re-exported here for the launcher and its tests
from ssl_xcit.engine.signals import HANGUP, INTERRUPT, REQUEUE, TERMINATE, StopSignals, requeue_signal  # noqa: F401


@dataclass(frozen=True)
class Decision:
    requeue: bool
    message: str


def decide(reasons: set[str], requeues_done: int, max_requeues: int,
           checkpoint: Path | None, limit_name: str = "max_requeues") -> Decision:
    """Requeue only for the warning signal, with a checkpoint on disk, while requeues are left.
    ``limit_name``: the submitter's word for ``max_requeues`` (launch/submit.py's option)."""
    where = f"checkpoint: {checkpoint}" if checkpoint else "no checkpoint was written"
    if REQUEUE not in reasons:
        names = {TERMINATE: "SIGTERM", HANGUP: "SIGHUP", INTERRUPT: "SIGINT"}
        got = ", ".join(names.get(r, r) for r in sorted(reasons)) or "SIGTERM"
        return Decision(False, f"stopped on {got}, not requeued ({where})")
    if checkpoint is None or not Path(checkpoint).is_file():
        return Decision(False, f"stopped but not requeued: {where}, a new run would start from scratch")
    if requeues_done >= max_requeues:
        return Decision(False, f"stopped and NOT requeued: {limit_name}={max_requeues} reached "
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


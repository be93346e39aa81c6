"""Test helpers for the SLURM launcher: a real local SLURM (session fixture), job polling, and
training functions that follow ``run_training``'s contract for pacing or faking a run.

The cluster comes from ``../shared/tools/start_local_slurm.sh`` (beside the repository, as in CI).
The fixture starts it in a fresh state folder and stops exactly the daemons it started; when it
cannot start (not root, no apt-get, the script missing or failing) the SLURM tests are skipped.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO.parent / "shared" / "tools"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "SPECIAL_EXIT"}


# --------------------------------------------------------------------------- the cluster
def _cluster_answers() -> bool:
    if shutil.which("scontrol") is None:
        return False
    try:
        return subprocess.run(["scontrol", "ping"], capture_output=True, text=True,
                              timeout=20).stdout.count("UP") > 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory) -> dict[str, Any]:
    """A running single-node SLURM with accounting (sacct), or a skip saying why not."""
    start, stop = TOOLS / "start_local_slurm.sh", TOOLS / "stop_local_slurm.sh"
    if _cluster_answers():   # someone else's cluster: use it, never stop it
        yield {"started": False}
        return
    if not start.exists():
        pytest.skip(f"no local SLURM: {start} not found")
    if os.geteuid() != 0:
        pytest.skip("no local SLURM: starting one needs root")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("no local SLURM: not installed and no apt-get to install it")
    env = dict(os.environ, SLURM_LOCAL_DIR=str(tmp_path_factory.mktemp("slurm_state")), SLURM_LOCAL_CLEAN="1",
               SLURM_LOCAL_ACCOUNTING="1", SLURM_LOCAL_CPUS="8")   # 8 > cores: test jobs run side by side
    try:
        out = subprocess.run(["bash", str(start)], env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        subprocess.run(["bash", str(stop)], env=env, capture_output=True, timeout=120)
        pytest.skip("no local SLURM: start_local_slurm.sh took more than 15 minutes")
    if out.returncode != 0:
        subprocess.run(["bash", str(stop)], env=env, capture_output=True, timeout=120)
        pytest.skip("no local SLURM: start_local_slurm.sh failed: " + (out.stderr.strip().splitlines() or ["?"])[-1])
    try:
        yield {"started": True, "state_dir": env["SLURM_LOCAL_DIR"]}
    finally:
        subprocess.run(["bash", str(stop)], env=env, capture_output=True, timeout=180)


# --------------------------------------------------------------------------- polling jobs
def job_info(job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Restarts, TimeLimit, ...); {} once SLURM forgot it."""
    out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True,
                         timeout=30)
    if out.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def job_state(job_id: str) -> str:
    info = job_info(job_id)
    if info:
        return info.get("JobState", "UNKNOWN")
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", str(job_id)], capture_output=True,
                         text=True, timeout=30)
    lines = out.stdout.split()
    return lines[-1] if lines else "UNKNOWN"


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def wait_job_end(job_id: str, timeout_s: float, log: Path | None = None) -> str:
    """Final state of a job (never hangs: SLURM polling with a deadline, unlike job.result())."""
    try:
        return wait_until(lambda: (s := job_state(job_id)).split()[0] in TERMINAL and s, timeout_s,
                          f"job {job_id} to end")
    except AssertionError:
        subprocess.run(["scancel", str(job_id)], capture_output=True, timeout=30)
        tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
        raise AssertionError(f"job {job_id} did not end within {timeout_s:.0f}s "
                             f"(state {job_state(job_id)}); log tail:\n{tail}") from None


def events(output_dir: Path, name: str | None = None) -> list[dict]:
    path = Path(output_dir) / "log.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if name is None or r.get("event") == name]


def last_step(output_dir: Path) -> int:
    steps = [r["global_step"] for r in events(output_dir, "train")]
    return max(steps) if steps else 0


# --------------------------------------------------------------------------- training stand-ins
@dataclass
class PacedTraining:
    """The real ``run_training``, slowed by ``step_s`` per step on a run that starts from scratch.

    A job's first run then cannot finish before SLURM's time-limit warning, whatever the machine's
    speed; a resumed run goes at full speed.
    """

    step_s: float

    def __call__(self, cfg: Any, stop_requested: Callable[[], bool] | None = None) -> Any:
        from ssl_xcit.engine.launch import run_training

        fresh = not (Path(cfg.run.output_dir) / "checkpoint.pth").exists()

        def paced() -> bool:
            if fresh:
                time.sleep(self.step_s)
            return stop_requested() if stop_requested is not None else False

        return run_training(cfg, stop_requested=paced)


@dataclass
class FakeTraining:
    """Follows ``run_training``'s contract without a model: joins the process group from the
    torchrun variables, all-reduces the stop flag at every step, rank 0 checkpoints atomically,
    a new run resumes. On a fresh run, ``signal_rank`` sends itself ``signal_name`` after
    ``signal_at_step`` steps (a stand-in for SLURM's warning reaching one task first).

    The result's ``total`` is sum over steps s=1..N of s * sum_r (r + 1): the same for any split of
    the run into stops and resumes, and easy to compute independently.
    """

    steps: int = 8
    step_s: float = 0.1
    signal_at_step: int = 0
    signal_rank: int = 1
    signal_name: str = "SIGUSR2"

    def __call__(self, cfg: Any, stop_requested: Callable[[], bool] | None = None) -> Any:
        import torch

        from ssl_xcit import distributed as du
        from ssl_xcit.atomic import atomic_torch_save, atomic_write_text

        info = du.init_distributed("cpu")
        out = Path(cfg.run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        ckpt, log = out / "fake_checkpoint.pt", out / "fake_log.jsonl"
        step, total, fresh = 0, 0.0, not ckpt.exists()
        if not fresh:
            state = torch.load(ckpt, weights_only=True)
            step, total = int(state["step"]), float(state["total"])

        def note(**record: Any) -> None:
            if info.rank == 0:
                old = log.read_text() if log.exists() else ""
                atomic_write_text(log, old + json.dumps(record) + "\n")

        def save() -> None:
            if info.rank == 0:
                atomic_torch_save({"step": step, "total": total}, ckpt)
            du.barrier()

        note(event="resume" if not fresh else "start", step=step, world_size=info.world_size)
        try:
            while step < self.steps:
                time.sleep(self.step_s)
                t = torch.tensor([float(info.rank + 1) * (step + 1)], dtype=torch.float64)
                total += du.all_reduce_sum(t).item()
                step += 1
                if fresh and step == self.signal_at_step and info.rank == self.signal_rank:
                    os.kill(os.getpid(), getattr(signal, self.signal_name))
                if du.any_rank(stop_requested() if stop_requested is not None else False):
                    save()
                    note(event="stopped", step=step)
                    return SimpleNamespace(status="stopped", global_step=step, checkpoint=ckpt, total=total)
            save()
            note(event="finished", step=step)
            return SimpleNamespace(status="finished", global_step=step, checkpoint=ckpt, total=total)
        finally:
            du.cleanup()


def fake_events(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / "fake_log.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

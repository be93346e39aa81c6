"""Job resources -> a submitit executor (SLURM or local), plus the checks that run before sbatch.

One ``JobSpec`` describes the request; ``slurm_parameters`` turns it into submitit's SLURM names,
used both to configure the ``AutoExecutor`` and to render the sbatch script for ``--dry-run``
(submitit's own renderer, so the preview is the script that would be submitted).
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from submitit.slurm import slurm as submitit_slurm

import ssl_xcit
from ssl_xcit.errors import SETTING, UserError, named

CLUSTERS = ("auto", "slurm", "local")


class SubmitError(UserError):
    """Bad input or an unusable cluster, found before (or instead of) a submission: one clear line."""


@dataclass
class JobSpec:
    nodes: int = 1
    tasks_per_node: int = 1           # one task per GPU; for CPU jobs as asked
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    timeout_min: int = 1440
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    comment: str | None = None
    mem_per_gpu: str | None = None
    job_name: str = "ssl_xcit"
    signal_delay_s: int = 90          # the warning signal comes this long before the time limit
    max_requeues: int = 20
    additional: dict[str, Any] = field(default_factory=dict)   # more sbatch parameters, passed through

    def __post_init__(self) -> None:
        """Each bad value named by its field (launch/submit.py says its own flag: ssl_xcit.errors.named)."""
        for name in ("nodes", "tasks_per_node", "timeout_min"):
            if getattr(self, name) < 1:
                raise named(SubmitError, f"{SETTING} must be at least 1, got {getattr(self, name)}", name)
        for name in ("gpus_per_node", "max_requeues", "signal_delay_s"):
            if getattr(self, name) < 0:
                raise named(SubmitError, f"{SETTING} must be >= 0, got {getattr(self, name)}", name)
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise named(SubmitError, f"{SETTING} must be at least 1, got {self.cpus_per_task}", "cpus_per_task")
        if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise named(SubmitError, f"one task per GPU: {SETTING} ({self.tasks_per_node}) must equal "
                        f"{{gpus_per_node}} ({self.gpus_per_node}) or be left out", "tasks_per_node", "gpus_per_node")

    @property
    def num_tasks(self) -> int:
        return self.nodes * self.tasks_per_node


def repo_pythonpath() -> str:
    """The folder holding the ``ssl_xcit`` package the submitter uses, so jobs import the same code."""
    return str(Path(ssl_xcit.__file__).resolve().parent.parent)


def setup_lines() -> list[str]:
    return [f"export PYTHONPATH={shlex.quote(repo_pythonpath())}${{PYTHONPATH:+:$PYTHONPATH}}"]


def slurm_parameters(spec: JobSpec) -> dict[str, Any]:
    """The spec in ``SlurmExecutor`` parameter names (the ``additional`` extras win over our own)."""
    params: dict[str, Any] = {
        "job_name": spec.job_name,
        "time": spec.timeout_min,
        "nodes": spec.nodes,
        "ntasks_per_node": spec.tasks_per_node,
        "signal_delay_s": spec.signal_delay_s,
        "setup": setup_lines(),
    }
    if spec.gpus_per_node:
        params["gpus_per_node"] = spec.gpus_per_node
    optional = {"cpus_per_task": spec.cpus_per_task, "partition": spec.partition, "account": spec.account,
                "qos": spec.qos, "constraint": spec.constraint, "comment": spec.comment,
                "mem_per_gpu": spec.mem_per_gpu}
    params.update({k: v for k, v in optional.items() if v is not None})
    extra = dict(spec.additional)
    if spec.max_requeues > 0:
        # scontrol requeue needs it on clusters whose slurm.conf sets JobRequeue=0
        extra.setdefault("requeue", True)
    if extra:
        params["additional_parameters"] = extra
    return params


def submitit_command(folder: Path) -> str:
    """What submitit runs in each task (the same string SlurmExecutor builds)."""
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def render_sbatch(spec: JobSpec, folder: Path) -> str:
    """The sbatch script submitit would submit, rendered without needing sbatch or srun."""
    return submitit_slurm._make_sbatch_string(command=submitit_command(folder), folder=folder,
                                              **slurm_parameters(spec))


def choose_cluster(cluster: str) -> str:
    """``auto``: SLURM when its client is installed, else submitit's local executor."""
    if cluster not in CLUSTERS:
        raise named(SubmitError, f"{SETTING} must be one of {', '.join(CLUSTERS)}, got {cluster!r}", "cluster")
    if cluster == "auto":
        cluster = "slurm" if (shutil.which("sbatch") or shutil.which("srun")) else "local"
    if cluster == "slurm":
        for tool in ("sbatch", "srun"):
            if shutil.which(tool) is None:
                raise named(SubmitError, f"'{tool}' is not on the PATH: this machine cannot submit SLURM jobs "
                            f"(run on a SLURM login node, or use {SETTING} local to run here)", "cluster")
    return cluster


def slurm_partitions() -> list[str] | None:
    """Partition names from ``sinfo``, or None when sinfo is missing or fails (sbatch will judge)."""
    if shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return sorted({line.strip() for line in out.stdout.splitlines() if line.strip()})


def check_partition(partition: str | None) -> None:
    if partition is None:
        return
    known = slurm_partitions()
    if known is not None and partition not in known:
        raise SubmitError(f"unknown SLURM partition '{partition}' (sinfo lists: {', '.join(known) or 'none'})")


def make_executor(spec: JobSpec, folder: Path, cluster: str) -> submitit.AutoExecutor:
    """An ``AutoExecutor`` pinned to ``cluster`` ('slurm' or 'local'), configured from the spec."""
    if cluster == "local" and spec.nodes != 1:
        raise named(SubmitError, f"{SETTING} local runs on this machine only: {{nodes}} must be 1, got {spec.nodes}",
                    "cluster", "nodes")
    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster,
                                     slurm_max_num_timeout=spec.max_requeues)
    if cluster == "slurm":
        # every SLURM parameter under its slurm_ name: the executor then holds exactly what
        # render_sbatch shows for a dry run
        executor.update_parameters(**{f"slurm_{k}": v for k, v in slurm_parameters(spec).items()})
    else:
        # the local executor sends the warning signal 30 s before the time limit (not settable)
        executor.update_parameters(name=spec.job_name, timeout_min=spec.timeout_min,
                                   tasks_per_node=spec.tasks_per_node, gpus_per_node=spec.gpus_per_node,
                                   local_setup=setup_lines())
    return executor


def reword_sbatch_error(err: Exception) -> str:
    """sbatch's refusal (from submitit's FailedJobError) as one line."""
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()] or lines or [type(err).__name__]
    line = errors[-1]
    if "invalid partition" in line.lower():
        return f"sbatch rejected the partition: {line}"
    return f"sbatch rejected the job: {line}"

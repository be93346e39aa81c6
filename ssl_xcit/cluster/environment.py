"""Inside a submitit task: describe the job and export the torchrun variables.

The training and evaluation entry points only read the torchrun variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT; see ``ssl_xcit.distributed``), so a SLURM or local submitit
task becomes a torchrun-like worker by exporting them from ``submitit.JobEnvironment``.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import submitit

# the range submitit's TorchDistributedEnvironment draws from: above the usual service ports
_PORT_LOW, _PORT_HIGH = 20000, 60000


@dataclass(frozen=True)
class TaskInfo:
    """Where this task sits in its job, and how to reach rank 0."""

    job_id: str
    restart: int          # SLURM_RESTART_COUNT: 0 for the first run, +1 for each requeue
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    num_nodes: int
    master_addr: str
    master_port: int

    @property
    def run_id(self) -> str:
        """Unique per run of a job: a requeued job keeps its id but not its restart count."""
        return f"{self.job_id}.{self.restart}"

    def torchrun_env(self) -> dict[str, str]:
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def master_port(job_id: str, restart: int) -> int:
    """A port every task of one run computes alike, without talking to the others.

    It changes with the restart count so that a requeued run never meets a socket its previous
    run left in TIME_WAIT on the same node.
    """
    digest = hashlib.sha256(f"{job_id}:{restart}".encode()).digest()
    return _PORT_LOW + int.from_bytes(digest[:4], "big") % (_PORT_HIGH - _PORT_LOW)


def current_task() -> TaskInfo:
    """This task's place in the running submitit job (SLURM or local executor)."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        raise RuntimeError("current_task() only works inside a job started by submitit "
                           "(SUBMITIT_EXECUTOR is not set)")
    env = submitit.JobEnvironment()
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    num_nodes = max(1, env.num_nodes)
    return TaskInfo(
        job_id=str(env.job_id),
        restart=restart,
        rank=env.global_rank,
        local_rank=env.local_rank,
        world_size=env.num_tasks,
        local_world_size=max(1, env.num_tasks // num_nodes),
        num_nodes=num_nodes,
        master_addr=env.hostnames[0],
        master_port=master_port(str(env.job_id), restart),
    )


def export_torch_env(task: TaskInfo | None = None) -> TaskInfo:
    """Set the torchrun variables for this task, replacing any inherited from the submitting shell.

    CUDA_VISIBLE_DEVICES is left as SLURM set it: ``init_distributed`` picks
    ``LOCAL_RANK % device_count`` which is right whether SLURM shows a task all GPUs of its node
    or only its own.
    """
    task = task if task is not None else current_task()
    os.environ.update(task.torchrun_env())
    return task

"""SLURM (and local) jobs through submitit: resources, torch.distributed from the job, stop-and-requeue.

Light on import: torch and the training code load only inside the jobs.
"""
from ssl_xcit.cluster.environment import TaskInfo, current_task, export_torch_env, master_port
from ssl_xcit.cluster.executor import (JobSpec, SubmitError, choose_cluster, make_executor, render_sbatch,
                                       slurm_parameters)
from ssl_xcit.cluster.stopping import Decision, StopRendezvous, StopSignals, decide
from ssl_xcit.cluster.tasks import EvalTask, TrainTask

__all__ = ["TaskInfo", "current_task", "export_torch_env", "master_port", "JobSpec", "SubmitError",
           "choose_cluster", "make_executor", "render_sbatch", "slurm_parameters", "Decision",
           "StopRendezvous", "StopSignals", "decide", "EvalTask", "TrainTask"]

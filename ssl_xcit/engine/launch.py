"""Running a config's loop in this process: join the process group the environment describes (if
any), train with the loop the config names (its schema's ``LOOP``: DINO pretraining or fine-tuning),
leave the group. Every launcher ends here: ``launch/train.py`` and ``launch/finetune.py``, torchrun,
and a SLURM job (:class:`ssl_xcit.cluster.tasks.TrainTask`)."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from ssl_xcit.engine.run import TrainResult


def run_training(cfg: Any, stop_requested: Callable[[], bool] | None = None) -> "TrainResult":
    """Join the process group described by the environment (if any), train (the loop of the
    config's kind: ``type(cfg).LOOP``, "module:function" of ``train(cfg, stop_requested)``), leave the group."""
    from ssl_xcit import distributed as dist_utils

    module, name = type(cfg).LOOP.split(":")
    train = getattr(importlib.import_module(module), name)
    dist_utils.init_distributed(cfg.run.device)
    try:
        return train(cfg, stop_requested=stop_requested)
    finally:
        dist_utils.cleanup()

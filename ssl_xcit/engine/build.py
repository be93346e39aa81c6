"""What every training loop builds the same way from its config and its :class:`~ssl_xcit.engine.run.Run`:
the resumable sampler and the loader over its images, the number of steps it trains, the per-rank
seeds from the point where ranks differ, and the models on the device (SyncBatchNorm, compile, DDP).
A loop's own builder (:mod:`ssl_xcit.train.build`, :mod:`ssl_xcit.finetune.build`) calls these in
the order that fixes its RNG streams.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ssl_xcit.data.folders import collate_skip_corrupt
from ssl_xcit.data.sampler import ResumableDistributedSampler
from ssl_xcit.engine.run import DataSetError, Run, worker_ignores_stop_signals
from ssl_xcit.engine.sync_bn import convert_sync_batchnorm


def training_sampler(dataset: Any, batch_size: int, world_size: int, rank: int, seed: int
                     ) -> ResumableDistributedSampler:
    """The resumable sampler over ``dataset``; fewer images than one global batch is one line."""
    if len(dataset) < batch_size * world_size:
        raise DataSetError(f"{len(dataset)} images are fewer than one global batch of {batch_size * world_size} "
                           f"({world_size} process(es) x batch_size_per_gpu={batch_size}): lower batch_size_per_gpu "
                           "or add images")
    return ResumableDistributedSampler(len(dataset), batch_size, num_replicas=world_size, rank=rank,
                                       shuffle=True, seed=seed)


def configured_steps(cfg: Any, steps_per_epoch: int) -> int:
    """Optimizer steps of the run as configured: ``epochs`` of the sampler's steps, capped by max_steps."""
    total = cfg.optim.epochs * steps_per_epoch
    return min(total, cfg.run.max_steps) if cfg.run.max_steps else total


def seed_this_rank(seed: int, rank: int) -> None:
    """From here on each rank draws its own numbers (stochastic depth, mixup): torch and NumPy are
    seeded with ``seed + rank``. Before this point every rank drew the same (the same initial weights)."""
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)


def training_loader(dataset: Any, sampler: ResumableDistributedSampler, batch_size: int, num_workers: int,
                    device: torch.device, seed: int) -> DataLoader:
    """The loader of a training run: unreadable images skipped and counted, workers that leave a
    stop signal to the main process (:func:`~ssl_xcit.engine.run.worker_ignores_stop_signals`)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_skip_corrupt, pin_memory=device.type == "cuda", drop_last=False,
                      persistent_workers=False, worker_init_fn=worker_ignores_stop_signals,
                      generator=torch.Generator().manual_seed(seed))  # keeps the global RNG untouched


def place_models(student: nn.Module, teacher: nn.Module | None, run_cfg: Any, run: Run
                 ) -> tuple[nn.Module, nn.Module | None, nn.Module]:
    """SyncBatchNorm under DDP, the device, ``torch.compile`` when asked, and DDP around the student:
    (student, teacher, the student as the step calls it)."""
    models = [m for m in (student, teacher) if m is not None]
    if run.world_size > 1 and run_cfg.sync_bn:
        models = [convert_sync_batchnorm(m, run.device) for m in models]
    for m in models:
        m.to(run.device)
        if run_cfg.compile:
            # in place (nn.Module.compile), so state_dict keys stay plain; static shapes give one
            # graph per crop resolution (global and local), each compiled once
            getattr(m, "backbone", m).compile(dynamic=False)
    student, teacher = models[0], (models[1] if teacher is not None else None)
    student_ddp: nn.Module = student
    if run.world_size > 1:
        student_ddp = nn.parallel.DistributedDataParallel(
            student, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if teacher is not None:
        teacher.train()  # DINO's teacher normalises with its own batch statistics
    return student, teacher, student_ddp

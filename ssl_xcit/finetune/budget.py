"""``time_budget_minutes`` for fine-tuning: a run's length given as wall-clock time is what
``recipe: auto`` and the lr schedule plan for, as with ``epochs`` or ``max_steps``.

Fine-tuning's recipe has choices that cannot change mid-run (mixup on or off, layer decay, the lr),
so the length must be known before the first step. It is estimated then: a throwaway classifier
of the run's arch, at its input size, makes a few forward/backward passes on a random batch of the run's size, and the steps
that fit in the budget at that pace are the plan ``recipe: auto`` is applied to. The estimate leaves
out data loading and validation, so from there the engine's clock (:class:`~ssl_xcit.engine.budget.TimeBudget`,
DINO's) plans again from the real pace of the first steps and at a third and two thirds of the plan,
each time laying the lr cosine over the new total (the recipe's discrete choices stay); it stops the
run at the budget if the machine slows down after that. The plan is the checkpoint's ``max_steps``
and the training time spent is saved, so a resumed run keeps its schedule and its remaining time.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_xcit.engine.budget import SAFETY, TimeBudget
from ssl_xcit.engine.step import autocast_context

WARMUP_PASSES, TIMED_PASSES = 2, 3


def step_seconds(model: nn.Module, batch_size: int, input_size: int, num_classes: int, device: torch.device,
                 precision: str) -> float:
    """Seconds of one training step's forward and backward of ``model``: a throwaway (its gradients
    and BatchNorm statistics change; the caller keeps the random streams, see ``_plan_budget``)."""
    probe = model.to(device).train()
    x = torch.randn(batch_size, 3, input_size, input_size, device=device)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    start = 0.0
    for i in range(WARMUP_PASSES + TIMED_PASSES):
        if i == WARMUP_PASSES:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        with autocast_context(device, precision):
            loss = F.cross_entropy(probe(x), y)
        loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / TIMED_PASSES


def planned_steps(minutes: float, seconds_per_step: float, steps_per_epoch: int, max_epochs: int) -> int:
    """The steps that fit in ``minutes`` at ``seconds_per_step`` (``SAFETY`` of it: evaluations and
    checkpoints take some), at least one, at most ``max_epochs`` epochs (the user's ``epochs``, or
    the config's limit)."""
    steps = max(1, int(SAFETY * 60.0 * minutes / max(seconds_per_step, 1e-9)))
    return min(steps, max_epochs * steps_per_epoch)


class FinetuneBudget:
    """The clock of a fine-tuning run and what a plan changes: ``max_steps``, ``epochs`` (enough of
    them), the run's total and the lr schedule (:meth:`after_step`, called by the loop each step)."""

    def __init__(self, clock: TimeBudget) -> None:
        self.clock = clock

    def after_step(self, run: Any, ft: Any) -> None:
        from ssl_xcit import distributed as dist_utils
        planned = self.clock.step_done(run.global_step)
        if planned is not None:
            planned = max(dist_utils.broadcast_int(planned, device=run.device), run.global_step + 1)
            self.clock.planned_steps = planned
            if planned != run.total_steps:
                self.set_length(ft, run, planned)
        if dist_utils.any_rank_flags(self.clock.spent, device=run.device)[0] and run.global_step < run.total_steps:
            if run.is_main:
                print(f"[ssl_xcit] time budget spent at step {run.global_step} of {run.total_steps}", flush=True)
                run.logger.event("time_budget_spent", global_step=run.global_step, planned_steps=run.total_steps)
            run.total_steps = run.global_step

    def set_length(self, ft: Any, run: Any, planned: int) -> None:
        """The run re-planned to ``planned`` steps from the pace so far: its lr cosine laid over them."""
        from ssl_xcit.engine.config import MAX_EPOCHS, user_set_keys
        from ssl_xcit.finetune.build import lr_schedule
        cfg, before = ft.cfg, run.total_steps
        max_epochs = cfg.optim.epochs if "optim.epochs" in user_set_keys(cfg) else MAX_EPOCHS
        planned = min(planned, max_epochs * run.steps_per_epoch)
        if planned == before:
            return
        run.total_steps = cfg.run.max_steps = planned
        cfg.optim.epochs = max(cfg.optim.epochs, -(-planned // run.steps_per_epoch))
        ft.lr = lr_schedule(cfg, run.steps_per_epoch, run.world_size, planned)
        if run.is_main:
            print(f"[ssl_xcit] time budget {cfg.optim.time_budget_minutes:g} min: {planned:,} steps re-planned from "
                  f"the pace so far (were {before:,}; {self.clock.elapsed:.1f} s spent on the first "
                  f"{run.global_step}); the lr cosine laid over them", flush=True)
            run.logger.event("time_budget_replanned", global_step=run.global_step, planned_steps=planned)
            run.write_config(ft.config_text())

"""The DINO training loop, readable top to bottom as DINO's ``train_dino`` and ``train_one_epoch``:
open the run (lock the output folder, :class:`~ssl_xcit.engine.run.Run`), build DINO's pieces
(:func:`~ssl_xcit.train.build.build_dino`), resume if the folder holds a checkpoint, open the logs,
then the epochs: each step is DINO's forward and loss, a look at the loss on every rank before
``backward`` (:meth:`Run.check_loss`), the update (:mod:`ssl_xcit.train.step`), logging and saving.

What only DINO has lives here: the k-NN monitor of the teacher (:mod:`ssl_xcit.train.monitor`), the
time budget with its re-plans (:mod:`ssl_xcit.train.budget`) and DINO's health warnings (collapse,
a diverging loss; :mod:`ssl_xcit.train.health`). The run machinery -- folder, lock, logs,
checkpoints, the NaN guard, stop requests, unreadable images -- is :mod:`ssl_xcit.engine.run`, which
the fine-tuning loop shares.
"""
from __future__ import annotations

import copy
from typing import Callable

from ssl_xcit.distributed import pick_device  # noqa: F401  (re-exported: benchmarks and the quickstart use it)
from ssl_xcit.train.budget import RunBudget
from ssl_xcit.train.build import (Dino, Schedules, build_dino, build_loss, build_models,  # noqa: F401
                                  build_optimizer, build_schedules, resolved_config)
from ssl_xcit.train.config import DinoConfig
from ssl_xcit.train.health import warn_if_collapsed, warn_if_diverging
from ssl_xcit.train.monitor import KnnMonitor
from ssl_xcit.engine.run import DataSetError, NonFiniteLossError, Run, TrainResult  # noqa: F401
from ssl_xcit.train.step import StepHParams, apply_update, forward_loss


def train(cfg: DinoConfig, stop_requested: Callable[[], bool] | None = None) -> TrainResult:
    """Run (or resume) DINO pretraining as configured. Distributed when a process group is up.

    ``stop_requested`` is polled once a step (all ranks agree on it): when true, the run saves a
    checkpoint at that step boundary and returns with status ``"stopped"``.
    """
    cfg = copy.deepcopy(cfg)   # recipe=auto and a time budget fill in values: the caller's config stays as given
    with Run.open(cfg, kind="dino") as run:
        dino = build_dino(cfg, run)
        run.attach(dino, dino.dataset, dino.sampler, dino.total_steps)
        budget = RunBudget.open(run, dino)
        resumed, state = run.resume()       # refuses before anything in output_dir is written
        if state is not None and budget is not None:
            budget.resumed(state)
        run.wire_checkpoint_extras(budget.checkpoint_state if budget is not None else _no_budget)
        # every rank: under torchrun each embeds a shard of the k-NN images (a bad eval_data_path stops here too)
        monitor = KnnMonitor.from_config(cfg, run.steps_per_epoch, run.device, logger=run)
        run.open_logs(dino.config_text(), resumed, dino.recipe, arch=cfg.model.arch)
        if budget is None:
            _say_schedule_cut(cfg, run)
        if monitor is not None:
            monitor.before_training(dino.teacher.backbone, run.global_step)   # step 0 only: the random start
        if budget is not None:
            budget.start()
        while run.global_step < run.total_steps:
            if train_one_epoch(run, dino, monitor, budget, stop_requested):
                return run.stopped()
            run.end_epoch()
        if monitor is not None:
            monitor.after_training(dino.teacher.backbone, run.global_step)
        return run.finish()


def train_one_epoch(run: Run, dino: Dino, monitor: KnnMonitor | None, budget: RunBudget | None,
                    stop_requested: Callable[[], bool] | None) -> bool:
    """The steps of one epoch from the run's position. True when a stop was requested (and saved)."""
    cfg = dino.cfg
    for batch in run.epoch_batches(dino.loader, cfg.optim.epochs):
        epoch, step = run.epoch, run.global_step
        hp = StepHParams(lr=float(dino.schedules.lr[step]), weight_decay=float(dino.schedules.weight_decay[step]),
                         teacher_momentum=float(dino.schedules.teacher_momentum[step]), epoch=epoch,
                         clip_grad=cfg.optim.clip_grad, freeze_last_layer=cfg.optim.freeze_last_layer,
                         koleo_loss_weight=cfg.dino.koleo_loss_weight,
                         freeze_backbone=step < cfg.optim.freeze_backbone_steps)
        crops = dino.crops_on_device(batch, run.device)
        if step == 0 and cfg.dino.center_init == "teacher":
            dino.init_center_from_teacher(crops, cfg.run.precision)
        loss = forward_loss(crops, dino.student_ddp, dino.teacher, dino.loss, hp, cfg.run.precision)
        loss_value = loss.item()
        stop_here = run.check_loss(loss_value, stop_requested)   # before backward: no update from a bad loss
        out = apply_update(loss, dino.student_ddp, dino.teacher, dino.loss, dino.optimizer, dino.scaler, hp,
                           dino.clip_groups)
        run.step_done(loss_value, len(batch), lr=hp.lr)
        if monitor is not None:
            with run.untimed():
                monitor.after_step(dino.teacher.backbone, run.global_step)
        if budget is not None:
            budget.after_step()
        if run.log_due():
            _log_step(run, dino, hp, out, loss_value, epoch)
        if run.after_step(stop_here):
            return True
    return False


def _log_step(run: Run, dino: Dino, hp: StepHParams, out, loss_value: float, epoch: int) -> None:
    """One log record (log.jsonl, TensorBoard) and DINO's health warnings that read it."""
    cfg = dino.cfg
    values = {"loss": loss_value, "lr": hp.lr, "weight_decay": hp.weight_decay,
              "teacher_momentum": hp.teacher_momentum,
              "teacher_temp": float(dino.loss.temperature(epoch)),
              "grad_norm": out.grad_norm.item(),
              "teacher_entropy": out.teacher_entropy.item(),
              "teacher_kl_uniform": out.teacher_kl_uniform.item()}
    if out.koleo is not None:
        values["koleo"] = out.koleo.item()
    values = run.log_scalars(values, epoch)
    warned = dino.warned   # each warning once per run (collapse: also across resumes, from log.jsonl)
    if "collapse" not in warned and warn_if_collapsed(values, cfg, run.global_step, run.logger, run.is_main):
        warned.add("collapse")
    if "diverging" not in warned and warn_if_diverging(values, cfg.model.out_dim, run.global_step, run.logger,
                                                       run.is_main, lr=cfg.optim.lr):
        warned.add("diverging")
        run.mark_diverging(f"its loss passed {values['loss']:.3g} at global step {run.global_step}")


def _say_schedule_cut(cfg: DinoConfig, run: Run) -> None:
    """``max_steps`` below ``epochs``' steps stops the run part-way through schedules laid over the
    epochs (DINO's meaning: a cap, e.g. for a smoke test or a slot): said once at the start, with the
    share and whether the lr is still warming up, so nobody reads a stopped run as a finished one.
    (``time_budget_minutes`` is the way to plan the schedules for a shorter run.)"""
    planned = cfg.optim.epochs * run.steps_per_epoch
    if not cfg.run.max_steps or cfg.run.max_steps >= planned or not run.is_main:
        return
    warmup = min(cfg.optim.warmup_epochs, cfg.optim.epochs) * run.steps_per_epoch
    where = "inside the lr warm-up" if cfg.run.max_steps <= warmup else "before the cosines end"
    print(f"[ssl_xcit] max_steps={cfg.run.max_steps} stops the run at {cfg.run.max_steps / planned:.0%} of the "
          f"{planned:,} steps its schedules are laid over (epochs={cfg.optim.epochs}), {where}: lower epochs "
          "(or use time_budget_minutes) to plan the schedules for the shorter run", flush=True)
    run.logger.event("schedule_cut", max_steps=cfg.run.max_steps, planned_steps=planned, in_warmup=cfg.run.max_steps <= warmup)


def _no_budget() -> dict:
    """A checkpoint's budget record without a budget (as it always was: no training time counted)."""
    return {"trained_seconds": None}

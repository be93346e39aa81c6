"""The DINO training loop, readable top to bottom as DINO's ``train_dino`` and ``train_one_epoch``:
open the run (lock the output folder, :class:`~ssl_xcit.train.run.Run`), build DINO's pieces
(:func:`~ssl_xcit.train.build.build_dino`), resume if the folder holds a checkpoint, open the logs,
then the epochs: each step is DINO's forward and loss, a look at the loss on every rank before
``backward`` (:meth:`Run.check_loss`), the update (:mod:`ssl_xcit.train.step`), logging and saving.

What only DINO has lives here: the k-NN monitor of the teacher (:mod:`ssl_xcit.train.monitor`), the
time budget with its re-plans (:mod:`ssl_xcit.train.budget`) and DINO's health warnings (collapse,
a diverging loss; :mod:`ssl_xcit.train.health`). The run machinery -- folder, lock, logs,
checkpoints, the NaN guard, stop requests, unreadable images -- is :mod:`ssl_xcit.train.run`, which
the fine-tuning loop shares.
"""
from __future__ import annotations

import copy
from typing import Callable

from ssl_xcit import distributed as dist_utils
from ssl_xcit.distributed import pick_device  # noqa: F401  (re-exported: benchmarks and the quickstart use it)
from ssl_xcit.train import recipe as recipe_rules
from ssl_xcit.train.budget import TimeBudget
from ssl_xcit.train.build import (Dino, Schedules, build_dino, build_loss, build_models,  # noqa: F401
                                  build_optimizer, build_schedules, resolved_config)
from ssl_xcit.train.config import MAX_EPOCHS, DinoConfig, user_set_keys
from ssl_xcit.train.health import warn_if_collapsed, warn_if_diverging
from ssl_xcit.train.monitor import KnnMonitor
from ssl_xcit.train.run import DataSetError, NonFiniteLossError, Run, TrainResult  # noqa: F401
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
        budget = _time_budget(cfg, run)
        resumed, state = run.resume()       # refuses before anything in output_dir is written
        if state is not None and budget is not None:
            budget = _resume_budget(run, dino, state)
        run.checkpoint_extras = lambda: {"trained_seconds": budget.elapsed if budget is not None else None}
        # every rank: under torchrun each embeds a shard of the k-NN images (a bad eval_data_path stops here too)
        monitor = KnnMonitor.from_config(cfg, run.steps_per_epoch, run.device)
        run.open_logs(dino.config_text(), resumed, dino.recipe, arch=cfg.model.arch)
        if budget is None:
            _say_schedule_cut(cfg, run)
        if monitor is not None:
            monitor.logger = run.logger
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


def train_one_epoch(run: Run, dino: Dino, monitor: KnnMonitor | None, budget: TimeBudget | None,
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
            _budget_after_step(run, dino, budget)
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


# ---- the time budget (time_budget_minutes > 0)

def _time_budget(cfg: DinoConfig, run: Run) -> TimeBudget | None:
    """A budget plans its steps after the first ones are timed: until then the run is open-ended
    (unless the user set epochs)."""
    if cfg.optim.time_budget_minutes <= 0:
        return None
    if "optim.epochs" not in user_set_keys(cfg):
        run.total_steps = MAX_EPOCHS * run.steps_per_epoch
    return TimeBudget(cfg.optim.time_budget_minutes)


def _resume_budget(run: Run, dino: Dino, state: dict) -> TimeBudget:
    """A time-budgeted run goes on with the steps it planned (the same schedules: exact resume) and
    the training time it already spent."""
    saved = state.get("config", {})
    planned = saved.get("run", {}).get("max_steps") or None
    cfg = dino.cfg
    if planned and saved.get("optim", {}).get("time_budget_minutes"):
        cfg.run.max_steps, cfg.optim.epochs = planned, saved["optim"]["epochs"]
        cfg.dino.momentum_teacher = saved["dino"]["momentum_teacher"]
        cfg.dino.final_momentum_teacher = saved["dino"].get("final_momentum_teacher", 1.0)
        cfg.optim.warmup_epochs = saved["optim"].get("warmup_epochs", cfg.optim.warmup_epochs)
        run.total_steps = planned
        dino.schedules = build_schedules(cfg, run.steps_per_epoch, run.world_size, total_steps=planned)
    return TimeBudget(cfg.optim.time_budget_minutes, state.get("trained_seconds") or 0.0, planned_steps=planned)


def _budget_after_step(run: Run, dino: Dino, budget: TimeBudget) -> None:
    """Plan the steps once the first ones are timed and re-plan them at a third and two thirds of
    the plan (rank 0's plan for all ranks), then stop at the planned step, or earlier when the
    clock says the budget is spent."""
    cfg = dino.cfg
    before = run.total_steps
    planned = budget.step_done(run.global_step)
    if planned is not None:
        planned = dist_utils.broadcast_int(planned, device=run.device)
        if "optim.epochs" in user_set_keys(cfg):
            planned = min(planned, cfg.optim.epochs * run.steps_per_epoch)
        planned = max(planned, run.global_step + 1)
        budget.planned_steps = planned           # rank 0's plan on every rank: the re-plan steps agree
    if planned is not None and (not budget.replans or planned != before):
        _lay_schedules_over(run, dino, budget, planned, before)
    if dist_utils.any_rank_flags(budget.spent, device=run.device)[0] and run.global_step < run.total_steps:
        if run.is_main:
            print(f"[ssl_xcit] time budget spent at step {run.global_step} of {run.total_steps}", flush=True)
            run.logger.event("time_budget_spent", global_step=run.global_step, planned_steps=run.total_steps)
        run.total_steps = run.global_step


def _lay_schedules_over(run: Run, dino: Dino, budget: TimeBudget, planned: int, before: int) -> None:
    cfg = dino.cfg
    run.total_steps = cfg.run.max_steps = planned
    cfg.optim.epochs = max(cfg.optim.epochs, -(-planned // run.steps_per_epoch))
    if dino.recipe is not None:
        recipe_rules.replan(cfg, planned, run.steps_per_epoch, user_set_keys(cfg))
    dino.schedules = build_schedules(cfg, run.steps_per_epoch, run.world_size, total_steps=planned)
    if not run.is_main:
        return
    what = "planned" if not budget.replans else f"re-planned from the pace so far (were {before:,})"
    msg = (f"time budget {cfg.optim.time_budget_minutes:g} min: {planned:,} steps {what} "
           f"({budget.elapsed:.1f} s spent on the first {run.global_step}); schedules laid over them "
           f"(lr warm-up {cfg.optim.warmup_epochs} epoch(s), teacher momentum {cfg.dino.momentum_teacher})")
    print(f"[ssl_xcit] {msg}", flush=True)
    run.logger.event("time_budget_replanned" if budget.replans else "time_budget_planned",
                     global_step=run.global_step, planned_steps=planned,
                     teacher_momentum=cfg.dino.momentum_teacher, warmup_epochs=cfg.optim.warmup_epochs)
    run.write_config(dino.config_text())

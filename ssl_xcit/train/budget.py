"""``time_budget_minutes`` for DINO: train for a wall-clock budget instead of a number of epochs.

DINO's schedules (lr, weight decay, teacher momentum) are cosines over the whole run, so a run that
is simply killed at its deadline ends with a high learning rate and a fast teacher, mid-schedule.
The engine's clock (:class:`~ssl_xcit.engine.budget.TimeBudget`) times the first steps, plans how many
fit and re-plans at a third and two thirds of the plan; :class:`RunBudget` lays DINO's cosines (and,
under recipe=auto, the warm-up and teacher momentum) over each plan. The planned number is saved in
the checkpoint's config (``max_steps``), so a resumed run keeps the same schedules instead of planning
anew (exact resume), and the training time spent before the stop counts against the budget.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ssl_xcit.engine.run import Run
    from ssl_xcit.train.build import Dino

from ssl_xcit.engine.budget import PROBE_STEPS, REPLAN_AT, SAFETY, SKIP_STEPS, TimeBudget  # noqa: F401  (re-exported)


class RunBudget:
    """A DINO run's time budget: its clock (:class:`TimeBudget`) and the plan laid over the run --
    the number of steps, and the schedules and recipe values that follow from it (:meth:`replan`).
    Built by :meth:`open` before the run resumes; the loop calls :meth:`resumed`, :meth:`start`
    and :meth:`after_step`."""

    def __init__(self, run: "Run", dino: "Dino", clock: TimeBudget) -> None:
        self.run, self.dino, self.clock = run, dino, clock

    @classmethod
    def open(cls, run: "Run", dino: "Dino") -> "RunBudget | None":
        """A budget plans its steps after the first ones are timed: until then the run is open-ended
        (unless the user set epochs). ``None`` without ``time_budget_minutes``."""
        from ssl_xcit.train.config import MAX_EPOCHS, user_set_keys
        cfg = dino.cfg
        if cfg.optim.time_budget_minutes <= 0:
            return None
        if "optim.epochs" not in user_set_keys(cfg):
            run.total_steps = MAX_EPOCHS * run.steps_per_epoch
        return cls(run, dino, TimeBudget(cfg.optim.time_budget_minutes))

    def resumed(self, state: dict) -> None:
        """A time-budgeted run goes on with the steps it planned (the same schedules: exact resume) and
        the training time it already spent."""
        saved = state.get("config", {})
        planned = saved.get("run", {}).get("max_steps") or None
        cfg, run = self.dino.cfg, self.run
        if planned and saved.get("optim", {}).get("time_budget_minutes"):
            cfg.run.max_steps, cfg.optim.epochs = planned, saved["optim"]["epochs"]
            cfg.dino.momentum_teacher = saved["dino"]["momentum_teacher"]
            cfg.dino.final_momentum_teacher = saved["dino"].get("final_momentum_teacher", 1.0)
            cfg.optim.warmup_epochs = saved["optim"].get("warmup_epochs", cfg.optim.warmup_epochs)
            run.total_steps = planned
            self.dino.schedules = self.schedules(planned)
        self.clock = TimeBudget(cfg.optim.time_budget_minutes, state.get("trained_seconds") or 0.0,
                                planned_steps=planned)

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint records of the budget: the training time spent."""
        return {"trained_seconds": self.clock.elapsed}

    def start(self) -> None:
        self.clock.start()

    def schedules(self, planned: int) -> Any:
        """DINO's schedules laid over ``planned`` steps."""
        from ssl_xcit.train.build import build_schedules
        return build_schedules(self.dino.cfg, self.run.steps_per_epoch, self.run.world_size, total_steps=planned)

    def after_step(self) -> None:
        """Plan the steps once the first ones are timed and re-plan them at a third and two thirds of
        the plan (rank 0's plan for all ranks), then stop at the planned step, or earlier when the
        clock says the budget is spent."""
        from ssl_xcit import distributed as dist_utils
        from ssl_xcit.train.config import user_set_keys
        run, cfg, clock = self.run, self.dino.cfg, self.clock
        before = run.total_steps
        planned = clock.step_done(run.global_step)
        if planned is not None:
            planned = dist_utils.broadcast_int(planned, device=run.device)
            if "optim.epochs" in user_set_keys(cfg):
                planned = min(planned, cfg.optim.epochs * run.steps_per_epoch)
            planned = max(planned, run.global_step + 1)
            clock.planned_steps = planned           # rank 0's plan on every rank: the re-plan steps agree
        if planned is not None and (not clock.replans or planned != before):
            self.dino.schedules = self.replan(planned)
            self._say_planned(planned, before)
        if dist_utils.any_rank_flags(clock.spent, device=run.device)[0] and run.global_step < run.total_steps:
            if run.is_main:
                print(f"[ssl_xcit] time budget spent at step {run.global_step} of {run.total_steps}", flush=True)
                run.logger.event("time_budget_spent", global_step=run.global_step, planned_steps=run.total_steps)
            run.total_steps = run.global_step

    def replan(self, planned: int) -> Any:
        """The run's length set to ``planned`` steps (``max_steps``, ``epochs`` and, under recipe=auto,
        the values that follow from the length: warm-up, teacher momentum); returns the schedules laid
        over them."""
        from ssl_xcit.train import recipe as recipe_rules
        from ssl_xcit.train.config import user_set_keys
        run, cfg = self.run, self.dino.cfg
        run.total_steps = cfg.run.max_steps = planned
        cfg.optim.epochs = max(cfg.optim.epochs, -(-planned // run.steps_per_epoch))
        if self.dino.recipe is not None:
            recipe_rules.replan(cfg, planned, run.steps_per_epoch, user_set_keys(cfg))
        return self.schedules(planned)

    def _say_planned(self, planned: int, before: int) -> None:
        """The plan on the console, in log.jsonl and in config.yaml (rank 0)."""
        run, cfg, clock = self.run, self.dino.cfg, self.clock
        if not run.is_main:
            return
        what = "planned" if not clock.replans else f"re-planned from the pace so far (were {before:,})"
        msg = (f"time budget {cfg.optim.time_budget_minutes:g} min: {planned:,} steps {what} "
               f"({clock.elapsed:.1f} s spent on the first {run.global_step}); schedules laid over them "
               f"(lr warm-up {cfg.optim.warmup_epochs} epoch(s), teacher momentum {cfg.dino.momentum_teacher})")
        print(f"[ssl_xcit] {msg}", flush=True)
        run.logger.event("time_budget_replanned" if clock.replans else "time_budget_planned",
                         global_step=run.global_step, planned_steps=planned,
                         teacher_momentum=cfg.dino.momentum_teacher, warmup_epochs=cfg.optim.warmup_epochs)
        run.write_config(self.dino.config_text())

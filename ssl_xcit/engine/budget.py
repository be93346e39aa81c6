"""The clock of a run with a wall-clock budget (``time_budget_minutes``), shared by DINO
(:mod:`ssl_xcit.train.budget`) and fine-tuning (:mod:`ssl_xcit.finetune.budget`).

Cosine schedules are laid over the whole run, so a run simply killed at its deadline ends mid-schedule
(a high lr). The clock times the first steps, plans how many fit in the budget, and re-plans at a third
and two thirds of the plan from the pace since the plan: a few steps say little about a whole run's
pace (evaluations, logging and checkpoints come later; a machine's speed drifts; on the 2-core dev CPU,
plans made from steps 4-11 alone ended runs at 153-160 s of a 180 s budget). It still says "spent" at
the budget if the machine slows down after the last re-plan. What the plan changes is the loop's
business: its schedules (and, under recipe=auto, the values that follow from the length).
"""
from __future__ import annotations

import time

SKIP_STEPS = 3       # the first steps pay for warm-up (workers starting, first allocations): not timed
PROBE_STEPS = 8      # steps timed after those before the plan
SAFETY = 0.95        # plan for this share of the time left: logging and checkpoints take some too
REPLAN_AT = (1 / 3, 2 / 3)   # shares of the plan at which the pace since the plan re-plans the rest


class TimeBudget:
    """The clock of one run: ``step_done`` after each optimizer step; ``plan`` once the probe is in."""

    def __init__(self, minutes: float, trained_seconds: float = 0.0, planned_steps: int | None = None) -> None:
        self.seconds = 60.0 * minutes
        self.before = trained_seconds            # training time of earlier runs of this output_dir
        self.planned_steps = planned_steps
        self._start: float | None = None
        self._stamps: list[float] = []
        self._planned_at: tuple[float, int] | None = None   # (clock, step) of the first plan made here
        self.replans = 0                                    # re-plans made so far

    def start(self) -> None:
        self._start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        """Training seconds so far, earlier runs included."""
        return self.before + (time.perf_counter() - self._start if self._start is not None else 0.0)

    @property
    def spent(self) -> bool:
        return self.elapsed >= self.seconds

    def step_done(self, global_step: int) -> int | None:
        """Record a step; returns the planned total number of steps when it is planned (once the
        probe is in) or re-planned (at ``REPLAN_AT`` of the plan; on every rank at the same steps),
        else ``None``. A run resumed with a saved plan keeps it: it was never planned here."""
        now = time.perf_counter()
        if self._planned_at is None:
            if self.planned_steps is not None:
                return None
            self._stamps.append(now)
            if len(self._stamps) < SKIP_STEPS + PROBE_STEPS:
                return None
            seconds_per_step = (self._stamps[-1] - self._stamps[SKIP_STEPS - 1]) / PROBE_STEPS
            self._planned_at = (now, global_step)
            self.planned_steps = self._steps_that_fit(global_step, seconds_per_step)
            return self.planned_steps
        if self.replans < len(REPLAN_AT) and global_step >= REPLAN_AT[self.replans] * self.planned_steps:
            # returned even when unchanged: under DDP every rank reaches this step and joins rank 0's broadcast
            self.replans += 1
            at, step = self._planned_at
            self.planned_steps = self._steps_that_fit(global_step, (now - at) / max(global_step - step, 1))
            return self.planned_steps
        return None

    def _steps_that_fit(self, global_step: int, seconds_per_step: float) -> int:
        left = max(0.0, self.seconds - self.elapsed)
        return global_step + int(SAFETY * left / max(seconds_per_step, 1e-9))

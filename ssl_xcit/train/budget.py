"""``time_budget_minutes``: train for a wall-clock budget instead of a number of epochs.

DINO's schedules (lr, weight decay, teacher momentum) are cosines over the whole run, so a run that
is simply killed at its deadline ends with a high learning rate and a fast teacher, mid-schedule.
Here the run times its first steps, plans how many steps fit in the budget, and lays the cosines
over exactly those steps; the clock still stops it at the budget if the machine slows down. The
planned number is saved in the checkpoint's config (``max_steps``), so a resumed run keeps the
same schedules instead of planning anew (exact resume), and the training time spent before the
stop counts against the budget.
"""
from __future__ import annotations

import time

SKIP_STEPS = 3       # the first steps pay for warm-up (workers starting, first allocations): not timed
PROBE_STEPS = 8      # steps timed after those before the plan
SAFETY = 0.95        # plan for this share of the time left: logging and checkpoints take some too


class TimeBudget:
    """The clock of one run: ``step_done`` after each optimizer step; ``plan`` once the probe is in."""

    def __init__(self, minutes: float, trained_seconds: float = 0.0, planned_steps: int | None = None) -> None:
        self.seconds = 60.0 * minutes
        self.before = trained_seconds            # training time of earlier runs of this output_dir
        self.planned_steps = planned_steps
        self._start: float | None = None
        self._stamps: list[float] = []

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
        """Record a step; returns the planned total number of steps once, when the probe is in."""
        if self.planned_steps is not None:
            return None
        self._stamps.append(time.perf_counter())
        if len(self._stamps) < SKIP_STEPS + PROBE_STEPS:
            return None
        seconds_per_step = (self._stamps[-1] - self._stamps[SKIP_STEPS - 1]) / PROBE_STEPS
        left = max(0.0, self.seconds - self.elapsed)
        self.planned_steps = global_step + int(SAFETY * left / max(seconds_per_step, 1e-9))
        return self.planned_steps

"""Per-iteration schedules (learning rate, weight decay, teacher momentum) as numpy tables.

A table indexed by the global iteration makes resuming trivial: the value at iteration ``it``
depends on nothing but ``it``.
"""
from __future__ import annotations

import numpy as np


def cosine_schedule(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                    warmup_epochs: int = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """``(epochs * niter_per_ep,)`` float64 values: linear warm-up, then cosine decay.

    With ``W = warmup_epochs * niter_per_ep`` and ``N = epochs * niter_per_ep - W`` (DINO's
    convention): ``value[i] = start + (base - start) * i / (W - 1)`` for ``i < W`` (so the last
    warm-up step reaches ``base_value``), then
    ``value[W + j] = final + (base - final) * (1 + cos(pi * j / N)) / 2`` for ``0 <= j < N``.
    """
    for name, value in (("epochs", epochs), ("niter_per_ep", niter_per_ep)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"cosine_schedule: {name} must be a positive int, got {value!r}")
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, (int, np.integer)) or warmup_epochs < 0:
        raise ValueError(f"cosine_schedule: warmup_epochs must be an int >= 0, got {warmup_epochs!r}")
    if warmup_epochs > epochs:
        raise ValueError(f"cosine_schedule: warmup_epochs={warmup_epochs} is longer than the run "
                         f"(epochs={epochs})")
    warmup_iters = int(warmup_epochs) * int(niter_per_ep)
    total = int(epochs) * int(niter_per_ep)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters, dtype=np.float64)
    n = total - warmup_iters
    j = np.arange(n, dtype=np.float64)
    cosine = final_value + 0.5 * (base_value - final_value) * (1.0 + np.cos(np.pi * j / max(n, 1)))
    return np.concatenate([warmup, cosine])


def teacher_momentum_schedule(epochs: int, niter_per_ep: int, base_momentum: float = 0.996,
                              final_momentum: float = 1.0) -> np.ndarray:
    """DINO's teacher EMA momentum: cosine from 0.996 to 1 over the run, no warm-up."""
    if not 0.0 <= base_momentum <= 1.0 or not 0.0 <= final_momentum <= 1.0:
        raise ValueError(f"teacher momentum must be in [0, 1], got base={base_momentum} final={final_momentum}")
    return cosine_schedule(base_momentum, final_momentum, epochs, niter_per_ep)

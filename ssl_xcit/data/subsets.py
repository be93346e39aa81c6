"""Evenly spread subsets: the one rule for "N of these images" everywhere (training's ``max_images``,
the k-NN monitor, the quickstart's k-NN, ``--limit``, the report's pictures, the benchmarks).

Over a sorted ImageFolder listing (images ordered by class) an even spread keeps every class in
proportion, where the first N would all be class 0. numpy only, so torch-free modules may use it.

>>> evenly_spread(10, 3).tolist()
[0, 4, 9]
>>> evenly_spread(4, 10).tolist()      # more asked than there are: all of them
[0, 1, 2, 3]
"""
from __future__ import annotations

import numpy as np


def evenly_spread(n_total: int, n: int) -> np.ndarray:
    """``min(n, n_total)`` sorted, distinct indices spread evenly over ``range(n_total)``, first and
    last included; all of them when ``n`` is 0 (no limit) or at least ``n_total``."""
    if n <= 0 or n >= n_total:
        return np.arange(n_total, dtype=np.int64)
    # consecutive points are >= 1 apart before rounding, so the rounded indices stay distinct
    return np.linspace(0, n_total - 1, n).round().astype(np.int64)

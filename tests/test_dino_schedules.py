"""cosine_schedule vs closed forms at chosen iterations."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ssl_xcit.dino.schedules import cosine_schedule, teacher_momentum_schedule


def test_warmup_then_cosine_closed_form():
    base, final, start, epochs, niter, warm = 1.0, 0.1, 0.2, 10, 7, 2
    s = cosine_schedule(base, final, epochs, niter, warmup_epochs=warm, start_warmup_value=start)
    assert s.shape == (70,) and s.dtype == np.float64
    w, n = 14, 56
    assert s[0] == pytest.approx(start)
    assert s[7] == pytest.approx(start + (base - start) * 7 / 13)
    assert s[13] == pytest.approx(base)
    assert s[14] == pytest.approx(base)  # cosine starts at base
    assert s[w + 28] == pytest.approx((base + final) / 2)  # cos(pi/2) = 0
    assert s[w + 14] == pytest.approx(final + (base - final) * (1 + math.cos(math.pi / 4)) / 2)
    assert s[-1] == pytest.approx(final + (base - final) * (1 + math.cos(math.pi * 55 / 56)) / 2)
    assert np.all(np.diff(s[:w]) > 0) and np.all(np.diff(s[w:]) < 0)


def test_no_warmup_and_all_warmup():
    s = cosine_schedule(0.5, 0.0, 3, 4)
    assert s[0] == pytest.approx(0.5) and s.shape == (12,)
    assert s[6] == pytest.approx(0.25)
    lin = cosine_schedule(2.0, 0.0, 2, 3, warmup_epochs=2, start_warmup_value=1.0)
    np.testing.assert_allclose(lin, [1.0, 1.2, 1.4, 1.6, 1.8, 2.0])


def test_teacher_momentum():
    m = teacher_momentum_schedule(100, 5)
    assert m[0] == pytest.approx(0.996)
    assert np.all(np.diff(m) >= 0) and m[-1] < 1.0
    assert m[-1] == pytest.approx(1.0 - 0.004 * (1 + math.cos(math.pi * 499 / 500)) / 2, rel=1e-15)


@pytest.mark.parametrize("args,kwargs,match", [
    ((1.0, 0.0, 5, 10), dict(warmup_epochs=6), "longer than the run"),
    ((1.0, 0.0, 0, 10), {}, "epochs"),
    ((1.0, 0.0, 5, 0), {}, "niter_per_ep"),
    ((1.0, 0.0, 5, 10), dict(warmup_epochs=-1), "warmup_epochs"),
    ((1.0, 0.0, 5.5, 10), {}, "epochs"),
])
def test_bad_args(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cosine_schedule(*args, **kwargs)

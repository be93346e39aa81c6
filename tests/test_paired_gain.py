"""The quickstart's paired comparison of two k-NN runs on the same queries (exact McNemar)."""
import numpy as np
import pytest
import torch

from ssl_xcit.commands.quickstart import paired_gain


def binomial_half_upper_tail(n: int, k: int) -> float:
    """P(X >= k), X ~ Binomial(n, 1/2), by convolving [1/2, 1/2] n times in float64 (no binomials)."""
    pmf = np.array([1.0])
    for _ in range(n):
        pmf = np.convolve(pmf, [0.5, 0.5])
    return float(pmf[k:].sum())


def hits_with(a_only: int, b_only: int, both: int, neither: int, seed: int = 0):
    pairs = [(1, 0)] * a_only + [(0, 1)] * b_only + [(1, 1)] * both + [(0, 0)] * neither
    order = np.random.default_rng(seed).permutation(len(pairs))
    a, b = np.array(pairs)[order].T
    return torch.from_numpy(a.astype(bool)), torch.from_numpy(b.astype(bool))


@pytest.mark.parametrize("a_only,b_only,both,neither", [(8, 2, 30, 60), (60, 40, 500, 400), (5, 5, 0, 3),
                                                        (0, 7, 10, 10), (120, 60, 600, 1220)])
def test_counts_gain_and_exact_p_value(a_only, b_only, both, neither):
    a, b = hits_with(a_only, b_only, both, neither)
    r = paired_gain(a, b)
    n = a_only + b_only + both + neither
    assert (r["a_only"], r["b_only"], r["n_discordant"]) == (a_only, b_only, a_only + b_only)
    assert r["gain"] == pytest.approx(100.0 * (a_only - b_only) / n)
    assert r["p_value"] == pytest.approx(binomial_half_upper_tail(a_only + b_only, a_only), rel=1e-9, abs=1e-300)


def test_known_small_case_and_symmetry():
    a, b = hits_with(8, 2, 0, 0)
    assert paired_gain(a, b)["p_value"] == pytest.approx((45 + 10 + 1) / 1024)   # C(10,8)+C(10,9)+C(10,10)
    assert paired_gain(b, a)["p_value"] == pytest.approx(1 - (1 + 10) / 1024)     # P(X >= 2) = 1 - P(X <= 1)
    assert paired_gain(a, a)["p_value"] == 1.0 and paired_gain(a, a)["gain"] == 0.0


def test_large_n_does_not_overflow():
    a, b = hits_with(900, 700, 200, 200)
    p = paired_gain(a, b)["p_value"]
    assert 0.0 < p < 1e-5


@pytest.mark.parametrize("a,b", [(torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool)),
                                 (torch.ones(0, dtype=torch.bool), torch.ones(0, dtype=torch.bool)),
                                 (torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool))])
def test_rejects_mismatched_or_empty_inputs(a, b):
    with pytest.raises(ValueError, match="paired_gain"):
        paired_gain(a, b)

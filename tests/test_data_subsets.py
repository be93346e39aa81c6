"""ssl_xcit.data.subsets.evenly_spread: the one subset rule, against a direct computation."""
from __future__ import annotations

import doctest
from fractions import Fraction

import pytest

from ssl_xcit.data import subsets
from ssl_xcit.data.subsets import evenly_spread


@pytest.mark.parametrize("n_total, n", [(10, 3), (100, 10), (1000, 37), (7, 6), (50000, 6400), (2, 2)])
def test_indices_are_the_rounded_even_points(n_total, n):
    got = evenly_spread(n_total, n).tolist()
    # exact rational points k (N-1) / (n-1), rounded half to even as numpy does
    want = [round(Fraction(k * (n_total - 1), n - 1)) for k in range(n)]
    assert got == want
    assert len(set(got)) == n and got == sorted(got) and got[0] == 0 and got[-1] == n_total - 1


def test_no_limit_or_too_many_means_all():
    assert evenly_spread(5, 0).tolist() == [0, 1, 2, 3, 4]
    assert evenly_spread(5, 9).tolist() == [0, 1, 2, 3, 4]
    assert evenly_spread(0, 3).tolist() == []


def test_every_class_of_a_sorted_listing_is_kept_in_proportion():
    labels = [c for c in range(10) for _ in range(5000)]     # ImageFolder order, CIFAR-10 train
    picked = [labels[i] for i in evenly_spread(len(labels), 6400)]
    assert {picked.count(c) for c in range(10)} <= {639, 640, 641}


def test_docstring_examples():
    assert doctest.testmod(subsets).failed == 0

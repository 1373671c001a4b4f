"""mean_ci and paired_difference against hand computations and scipy."""
import math

import numpy as np
import pytest
from scipy import stats as sps

from gradalign.experiments.stats import mean_ci, paired_difference


def test_mean_ci_by_hand():
    mean, lo, hi = mean_ci([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)                   # t_{0.975, 2} * s / sqrt(n)
    assert mean == 2.0 and lo == pytest.approx(2 - half) and hi == pytest.approx(2 + half)


def test_mean_ci_matches_scipy_interval():
    x = np.random.default_rng(0).normal(size=11)
    for level in (0.9, 0.95, 0.99):
        expected = sps.t.interval(level, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
        _, lo, hi = mean_ci(x, level=level)
        assert (lo, hi) == pytest.approx(expected)


def test_mean_ci_single_value_and_constant():
    mean, lo, hi = mean_ci([0.7])
    assert mean == 0.7 and math.isnan(lo) and math.isnan(hi)
    assert mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)


def test_mean_ci_nan_propagates():
    mean, lo, hi = mean_ci([1.0, float("nan"), 2.0])
    assert math.isnan(mean) and math.isnan(lo) and math.isnan(hi)


@pytest.mark.parametrize("values, level", [([], 0.95), ([[1.0, 2.0]], 0.95), ([1.0, 2.0], 1.0),
                                           ([1.0, 2.0], 0.0)])
def test_mean_ci_bad_input(values, level):
    with pytest.raises(ValueError):
        mean_ci(values, level=level)


def test_paired_difference_matches_scipy():
    rng = np.random.default_rng(1)
    b = rng.normal(size=8)
    a = b + 0.3 + 0.2 * rng.normal(size=8)
    out = paired_difference(a, b)
    assert out["n"] == 8
    assert out["p_value"] == pytest.approx(sps.ttest_rel(a, b).pvalue)
    mean, lo, hi = mean_ci(a - b)
    assert (out["mean"], out["lo"], out["hi"]) == pytest.approx((mean, lo, hi))
    assert out["lo"] < out["mean"] < out["hi"]


def test_paired_difference_by_hand():
    out = paired_difference([3.0, 5.0, 4.0], [1.0, 2.0, 3.0])      # d = 2, 3, 1: mean 2, s 1
    t = 2 / (1 / math.sqrt(3))
    assert out["mean"] == 2.0 and out["p_value"] == pytest.approx(2 * sps.t.sf(t, 2))


def test_paired_difference_degenerate():
    same = paired_difference([0.6, 0.7, 0.8], [0.6, 0.7, 0.8])
    assert same == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "p_value": 1.0, "n": 3}
    shifted = paired_difference([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    assert shifted["lo"] == shifted["hi"] == 1.0 and shifted["p_value"] == 0.0
    one = paired_difference([0.5], [0.4])
    assert one["mean"] == pytest.approx(0.1) and math.isnan(one["p_value"]) and math.isnan(one["lo"])
    assert math.isnan(paired_difference([1.0, float("nan")], [0.0, 1.0])["p_value"])


def test_paired_difference_length_mismatch():
    with pytest.raises(ValueError, match="same length"):
        paired_difference([1.0, 2.0], [1.0])

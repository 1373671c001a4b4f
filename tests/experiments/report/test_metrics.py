"""The report's statistics: intervals of accuracies and rates stay inside what they can take."""
import math

import pytest

from gradalign.experiments.report.metrics import paired, stat, stat_against
from gradalign.experiments.report.tables import estimate
from gradalign.experiments.stats import mean_ci


def test_an_accuracy_interval_over_two_seeds_is_clipped_to_zero_and_one():
    values = [0.0, 0.024]                                  # the t interval of 2 seeds: about [-0.14, 0.17]
    mean, lo, hi = mean_ci(values)
    assert lo < 0
    s = stat(values, "test_acc")
    assert (s["mean"], s["lo"], s["hi"]) == (pytest.approx(mean), 0.0, pytest.approx(hi))
    assert estimate(s, "test_acc") == f"1.20% [0.00%, {100 * hi:.2f}%]"
    high = stat([0.99, 1.0], "test_acc")
    assert high["hi"] == 1.0 and high["lo"] == pytest.approx(mean_ci([0.99, 1.0])[1])
    loss = stat([0.0, 0.024], "test_loss")               # not a rate: the t interval as it is
    assert loss["lo"] == pytest.approx(lo)


def test_a_paired_difference_of_rates_is_clipped_to_minus_one_and_one():
    d = paired({0: 1.0, 1: 0.0}, {0: 0.0, 1: 0.0}, "test_acc")
    assert d["lo"] == -1.0 and d["hi"] == 1.0 and d["mean"] == 0.5
    assert stat_against({0: 1.0, 1: 0.0}, {0: 0.0, 1: 0.0}, "test_acc")["diff"] == d
    assert math.isnan(stat([0.5], "test_acc")["lo"])      # one seed: no interval, nothing to clip

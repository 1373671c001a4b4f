"""Statistics for comparing runs over seeds: t intervals and paired differences.

Pure numpy/scipy; inputs are 1-D sequences of numbers, outputs are Python floats.
Non-finite inputs to ``mean_ci`` and ``paired_difference`` propagate as nan (a failed run
shows up as nan in a table instead of raising).

Example:
    >>> mean_ci([0.60, 0.62, 0.61])                      # (mean, lo, hi), 95% Student t
    >>> paired_difference(method_acc, baseline_acc)      # same seeds, method - baseline
"""
from __future__ import annotations

import numpy as np
from scipy import stats as sps


def mean_ci(values, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided Student t confidence interval of ``values`` (n,).

    ``lo, hi = mean -/+ t_{(1+level)/2, n-1} * s / sqrt(n)`` with s the sample standard
    deviation (ddof=1). With n = 1 the interval is undefined: ``lo = hi = nan``.
    """
    x = as_1d(values, "values")
    _check_level(level)
    mean = float(np.mean(x))
    if len(x) < 2:
        return mean, float("nan"), float("nan")
    half = sps.t.ppf((1 + level) / 2, len(x) - 1) * np.std(x, ddof=1) / np.sqrt(len(x))
    return mean, float(mean - half), float(mean + half)


def paired_difference(a, b, level: float = 0.95) -> dict[str, float | int]:
    """Paired comparison of ``a`` and ``b`` (n,), e.g. a method and its baseline on the same seeds.

    Returns ``dict(mean, lo, hi, p_value, n)``: mean and Student t interval of d = a - b
    (as ``mean_ci``), and the two-sided p-value of the paired t-test (``scipy.stats.ttest_rel``).
    Degenerate cases, where the t statistic is 0/0 or x/0:
    - n = 1: lo, hi and p_value are nan;
    - every difference exactly 0 (identical inputs): the interval is [0, 0] and p_value = 1.0
      (no evidence of a difference);
    - every difference the same nonzero number: the interval has zero width and p_value = 0.0
      (the limit of the test as the spread goes to 0).
    """
    x, y = as_1d(a, "a"), as_1d(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired_difference needs a and b of the same length; got {len(x)} and {len(y)}")
    d = x - y
    mean, lo, hi = mean_ci(d, level)
    if len(d) < 2:
        p_value = float("nan")
    elif np.all(d == d[0]):
        p_value = 1.0 if d[0] == 0 else 0.0
    else:
        p_value = float(sps.ttest_rel(x, y).pvalue)
    return {"mean": mean, "lo": lo, "hi": hi, "p_value": p_value, "n": len(d)}


def as_1d(values, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers; got shape {x.shape}")
    return x


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {level!r}")

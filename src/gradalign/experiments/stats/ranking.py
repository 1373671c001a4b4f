"""Ranking metrics: how well a score separates positives from negatives.

Example:
    >>> auroc(-alignment, is_flipped)                    # do low scores flag noisy labels?
"""
from __future__ import annotations

import numpy as np
from scipy import stats as sps

from gradalign.experiments.stats.intervals import as_1d


def auroc(scores, labels) -> float:
    """Area under the ROC curve: the probability that a positive scores higher than a negative.

    Args:
        scores: (n,) finite numbers; higher means "more likely positive".
        labels: (n,) booleans or 0/1; 1 marks a positive.

    Computed from average ranks (Mann-Whitney U / (n_pos * n_neg)), so tied scores count 1/2.

    Raises:
        ValueError: mismatched lengths, non-finite scores, labels other than 0/1, or only one
            class present (the AUROC is undefined then).
    """
    s = as_1d(scores, "scores")
    lab = np.asarray(labels)
    if lab.shape != s.shape:
        raise ValueError(f"auroc needs scores and labels of the same shape; got {s.shape} and {lab.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("auroc needs finite scores; drop or replace nan/inf first")
    if not np.all((lab == 0) | (lab == 1)):
        raise ValueError("auroc needs labels that are booleans or 0/1")
    pos = lab.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auroc needs both classes; got {n_pos} positives and {n_neg} negatives")
    ranks = sps.rankdata(s)                                    # average ranks for ties
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))

"""auroc against hand computations and a pairwise count."""
import itertools

import numpy as np
import pytest

from gradalign.experiments.stats import auroc


def _auroc_pairs(scores, labels):
    """Brute force: fraction of (positive, negative) pairs ordered correctly, ties 1/2."""
    pos = [s for s, l in zip(scores, labels) if l]
    neg = [s for s, l in zip(scores, labels) if not l]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_by_hand():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auroc([1.0, 2.0], [0, 1]) == 1.0 and auroc([1.0, 2.0], [True, False]) == 0.0
    assert auroc([0.5, 0.5, 0.5], [1, 0, 1]) == 0.5                 # all tied


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=30).astype(float)              # many ties
    labels = rng.integers(0, 2, size=30)
    labels[:2] = [0, 1]
    assert auroc(scores, labels) == pytest.approx(_auroc_pairs(scores, labels))


@pytest.mark.parametrize("scores, labels, match", [
    ([0.1, 0.2], [1, 1], "both classes"),
    ([0.1, 0.2], [0, 0], "both classes"),
    ([0.1, 0.2], [0, 2], "0/1"),
    ([0.1, float("nan")], [0, 1], "finite"),
    ([0.1, 0.2, 0.3], [0, 1], "same shape"),
])
def test_auroc_errors(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        auroc(scores, labels)

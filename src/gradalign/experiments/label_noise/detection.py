"""Mislabel detection: rank training samples by a per-sample signal, score the ranking against
the flipped labels.

The records of one run (method_table/recording.py, a .npz per run) hold, per training sample i (row) and
epoch t (column: the t-th pass over the sample), what its training forward gave before the
update on it: ``loss``, ``grad_norm``, ``cosine``, ``cosine_loo``, ``margin``, ``correct`` and
``gwa``. Each
signal turns them into a per-epoch value and a value over the whole training run, oriented
so that a HIGHER score means MORE SUSPECT (the ``suspect`` column says which raw values are
suspect):

    signal      per-epoch value v_t                         over training            suspect
    loss        cross-entropy w.r.t. the assigned label     mean over epochs         high   (small-loss criterion)
    grad_norm   |g_i|, all parameters (engine)              mean over epochs         high
    cosine      cos(g_i, batch-mean gradient) (engine)      mean over epochs         low    (GASW's signal)
    cosine_loo  cos(g_i, mean of the other samples)         mean over epochs         low    (GASW, leave-one-out)
    aum         margin: assigned logit - largest other      mean over epochs = AUM   low    (Pleiss et al. 2020)
    forgetting  forgetting events in epochs 0..t            events over all epochs   high   (Toneva et al. 2019)
    gwa         GWA alignment a_i (GWAMonitor)              mean over epochs         low    (Hoelzl et al. 2025)

A forgetting event is a transition from correct to incorrect between two consecutive passes
(correct: the argmax is the assigned label). As in Toneva et al., a sample never learned
counts as forgotten more often than any learned one: its count is set to (passes observed + 1).

Metrics of a ranking against the flips (``detect``): the AUROC, and the precision at the true
noise rate, i.e. the fraction of flipped samples among the K most suspect, K = the number of
flipped samples (ties share their slots: the expected precision under a random order of tied
samples). Both for the value over training ("averaged over training") and per epoch; the best
epoch is the maximum over epochs, an ORACLE choice (it uses the true flips).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

from gradalign.experiments.stats.ranking import auroc


@dataclass(frozen=True)
class Signal:
    """A detection signal: the record it reads, its direction and what it is."""

    name: str
    label: str
    record: str               # the records key it is computed from
    suspect: str              # "high" or "low": which raw values are suspect
    per_epoch: Callable[[np.ndarray], np.ndarray]   # record (N, E) -> raw values (N, E)
    overall: Callable[[np.ndarray], np.ndarray]     # record (N, E) -> raw value over training (N,)

    @property
    def sign(self) -> float:
        return 1.0 if self.suspect == "high" else -1.0


def _nanmean(m: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)          # rows never visited stay nan
        return np.nanmean(m.astype(np.float64), axis=1)


def forgetting_events(correct: np.ndarray) -> np.ndarray:
    """(N, E) cumulative forgetting counts from correctness (N, E) int (1, 0, or -1: not visited).

    Entry (i, t): transitions correct -> incorrect between consecutive observed passes of
    sample i up to pass t; a sample not yet learned by pass t (never correct) gets
    (passes observed up to t) + 1, more than any count a learned sample can have.
    """
    c = np.asarray(correct)
    n, e = c.shape
    out = np.zeros((n, e), np.float64)
    prev = np.full(n, -1)                      # last observed correctness, -1: none yet
    count = np.zeros(n)
    seen = np.zeros(n)
    learned = np.zeros(n, bool)
    for t in range(e):
        obs = c[:, t] >= 0
        now = c[:, t]
        count += obs & (prev == 1) & (now == 0)
        learned |= obs & (now == 1)
        seen += obs
        prev = np.where(obs, now, prev)
        out[:, t] = np.where(learned, count, seen + 1)
    return out


SIGNALS: dict[str, Signal] = {s.name: s for s in (
    Signal("loss", "training loss (small-loss criterion)", "loss", "high", lambda m: m, _nanmean),
    Signal("grad_norm", "per-sample gradient norm", "grad_norm", "high", lambda m: m, _nanmean),
    Signal("cosine", "cosine to the batch-mean gradient (GASW)", "cosine", "low", lambda m: m, _nanmean),
    Signal("cosine_loo", "cosine to the other samples' mean (GASW leave-one-out)", "cosine_loo", "low", lambda m: m,
           _nanmean),
    Signal("aum", "area under the margin (AUM)", "margin", "low", lambda m: m, _nanmean),
    Signal("forgetting", "forgetting events", "correct", "high", forgetting_events,
           lambda m: forgetting_events(m)[:, -1]),
    Signal("gwa", "GWA alignment", "gwa", "low", lambda m: m, _nanmean),
)}
SIGNAL_NAMES = tuple(SIGNALS)


def scores(signal: str, records: dict) -> tuple[np.ndarray, np.ndarray]:
    """(per-epoch (N, E), over training (N,)) suspicion scores of a signal: higher = more suspect."""
    s = SIGNALS[signal]
    m = np.asarray(records[s.record])
    return s.sign * s.per_epoch(m).astype(np.float64), s.sign * s.overall(m).astype(np.float64)


def precision_at_k(score, positive, k: int | None = None) -> float:
    """Fraction of positives among the k highest scores (default k = the number of positives).

    Ties at the cut share the remaining slots: the expected precision when tied samples are
    taken in a random order.
    """
    s, pos = np.asarray(score, np.float64), np.asarray(positive, bool)
    if s.shape != pos.shape or s.ndim != 1:
        raise ValueError(f"precision_at_k needs two 1-D arrays of one length; got {s.shape} and {pos.shape}")
    k = int(pos.sum()) if k is None else int(k)
    if not 1 <= k <= len(s):
        raise ValueError(f"k must be in [1, {len(s)}], got {k}")
    cut = np.sort(s)[::-1][k - 1]
    above, tied = s > cut, s == cut
    expected = pos[above].sum() + (k - above.sum()) * pos[tied].sum() / tied.sum()
    return float(expected / k)


def most_suspect(score, fraction: float, seed: int) -> np.ndarray:
    """Row indices of the round(fraction * N) most suspect samples (highest scores; ties broken
    by a random order drawn from `seed`), most suspect first. Not-finite scores rank last."""
    s = np.asarray(score, np.float64)
    tie = np.random.default_rng(seed).permutation(len(s))
    key = np.where(np.isfinite(s), s, -np.inf)
    order = np.lexsort((tie, -key))
    return order[:round(fraction * len(s))]


def _metrics(score: np.ndarray, flipped: np.ndarray) -> tuple[float, float]:
    ok = np.isfinite(score)
    if not ok.any() or flipped[ok].all() or not flipped[ok].any():
        return float("nan"), float("nan")
    return auroc(score[ok], flipped[ok]), precision_at_k(score[ok], flipped[ok])


def detect(records: dict, signals=SIGNAL_NAMES) -> dict:
    """Per signal: AUROC and precision at the noise rate of the value over training, per epoch,
    and at the best epoch (max over epochs, an oracle). Needs records["flipped"] (N,) bool;
    returns {} when no sample (or every sample) is flipped. Signals whose record is missing
    (records made before the signal existed) are left out."""
    flipped = np.asarray(records["flipped"], bool)
    if not flipped.any() or flipped.all():
        return {}
    out = {}
    for name in signals:
        if SIGNALS[name].record not in records:
            continue
        per_epoch, overall = scores(name, records)
        auc, prec = _metrics(overall, flipped)
        by_epoch = [_metrics(per_epoch[:, t], flipped) for t in range(per_epoch.shape[1])]
        auc_t = np.array([a for a, _ in by_epoch])
        prec_t = np.array([p for _, p in by_epoch])
        best_a = int(np.nanargmax(auc_t)) if np.isfinite(auc_t).any() else None
        best_p = int(np.nanargmax(prec_t)) if np.isfinite(prec_t).any() else None
        nan = float("nan")
        out[name] = {"auroc": auc, "precision": prec, "auroc_epochs": auc_t.tolist(),
                     "precision_epochs": prec_t.tolist(), "auroc_best_epoch": best_a, "precision_best_epoch": best_p,
                     "auroc_best": float(auc_t[best_a]) if best_a is not None else nan,
                     "precision_best": float(prec_t[best_p]) if best_p is not None else nan}
    return out

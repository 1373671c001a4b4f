"""GASW and GDSW: per-sample weights from each sample's gradient alignment with the batch.

s_i = cos(g_i, gbar), gbar = (1/B) sum_j g_j
GASW: w_i = max(0, s_i)^gamma      (weight the consensus)
GDSW: w_i = (1 - s_i)^gamma        (weight the disagreement)
then w <- B w / sum_j w_j, and the update direction is (1/B) sum_i w_i g_i.

Data parallel (an engine with a process group): s_i is the cosine to the mean over every
rank's samples, B and sum_j w_j are global (sum_j w_j costs one scalar all-reduce), so the
weights of all ranks together sum to the global B; each rank keeps its own samples' weights,
and the fallback decision is the same on every rank.

Use as `engine.backward(losses, weights=GASW(gamma=2.0))`: the engine forms the weighted
gradient from the same backward, with no (B, P) matrix and no second backward.

Related published work: Ren et al., "Learning to Reweight Examples for Robust Deep
Learning", ICML 2018 (alignment with a clean validation gradient); Sedova et al., "Learning
with Noisy Labels by Adaptive Gradient-Based Outlier Removal" (AGRA), ECML-PKDD 2023;
Chaubard, Eddy, Kochenderfer, "Beyond Gradient Averaging in Parallel Optimization: Improved
Robustness through Gradient Agreement Filtering", arXiv:2412.18052 (cosine filtering of
micro-batch gradients).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from gradalign.engine.gradient_stats import GradientStats


class _CosineWeighting:
    """Shared mechanism: cosines -> raw weights (subclass) -> normalised weights, with guards.

    Degenerate steps (|gbar| = 0, every raw weight 0, or anything non-finite) fall back to
    uniform weights and are counted in `fallbacks`; they never produce NaN. An empty batch (B = 0
    over every rank, e.g. from Poisson sampling) gets weights of shape (0,) and is not counted. The choice is made
    on the device (torch.where) and counted in a tensor, so a step never waits for the GPU:
    only reading `fallbacks` (or last_zero_fraction, last_entropy) does.
    """

    finite_weights = True  # never NaN or infinite (degenerate steps fall back): the engine skips its check
    needs = frozenset({"norms", "cosines"})  # what it reads: the engine's backward prepares S for it

    def __init__(self, gamma: float = 2.0, *, leave_one_out: bool = False):
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
        if not isinstance(leave_one_out, bool):  # a truthy string ("no") would turn it on
            raise ValueError(f"leave_one_out must be True or False, got {leave_one_out!r}")
        self.gamma = float(gamma)
        self.leave_one_out = leave_one_out
        self.steps = 0
        self._usable: Tensor | int = 0  # steps with usable weights; a tensor on the statistics' device
        self.last_weights: Tensor | None = None

    def _raw(self, cosines: Tensor) -> Tensor:
        """Raw weights >= 0 from the cosines (which may stray outside [-1, 1] by rounding)."""
        raise NotImplementedError

    def __call__(self, stats: GradientStats) -> Tensor:
        """(B,) weights summing to B for the batch whose statistics are `stats` (data parallel:
        this rank's samples' weights; summed over ranks they give the global B)."""
        B, reduce = _global_batch(stats), getattr(stats, "sum_over_ranks", None)
        if B == 0:  # an empty batch (on every rank): no weights, and no step to count
            return torch.ones_like(stats.norms)
        self.steps += 1
        cosines = leave_one_out_cosines(stats) if self.leave_one_out else stats.cosines
        raw = self._raw(cosines)
        total = raw.sum() if reduce is None else reduce(raw.sum())
        # raw >= 0, so a finite (global) total means every rank's raw weights are finite. |S|^2
        # over the statistics' scale rather than |gbar|^2, which underflows to 0 for tiny (e.g.
        # loss-scaled) gradients
        scaled = getattr(stats, "scaled_sums", None)
        sum_sq = scaled()[2] if scaled is not None else stats.mean_grad_sq_norm
        if total.device.type == "cpu":  # a host read is free: decide here, in fewer operator calls
            t = float(total)
            usable = math.isfinite(t) and t > 0 and float(sum_sq) > 0
            weights = raw * (B / t) if usable else torch.ones_like(raw)
        else:  # on the device: no host read per step
            usable = torch.isfinite(total) & (total > 0) & (sum_sq > 0)
            weights = torch.where(usable, raw * (B / total), 1.0)  # (B / total is masked where unusable)
        self._usable = self._usable + usable
        self.last_weights = weights
        return weights

    def state_dict(self) -> dict:
        """What resuming a run needs: the step and fallback counts."""
        return {"steps": self.steps, "fallbacks": self.fallbacks}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() gave: {"steps": int, "fallbacks": int}."""
        missing = [k for k in ("steps", "fallbacks") if not isinstance(state, dict) or k not in state]
        if missing:
            raise ValueError(f"{type(self).__name__}.load_state_dict needs the dict state_dict() returns, with "
                             f"'steps' and 'fallbacks'; missing {missing}")
        steps, fallbacks = int(state["steps"]), int(state["fallbacks"])
        if not 0 <= fallbacks <= steps:
            raise ValueError(f"{type(self).__name__}.load_state_dict: need 0 <= fallbacks <= steps, got "
                             f"steps={steps}, fallbacks={fallbacks}")
        self.steps = steps
        self._usable = steps - fallbacks

    @property
    def _fallbacks(self) -> Tensor | int:
        """Steps that fell back, on the statistics' device (no host read)."""
        return self.steps - self._usable

    @property
    def fallbacks(self) -> int:
        """Steps that fell back to uniform weights (reading it waits for the device)."""
        return int(self._fallbacks)

    @property
    def last_zero_fraction(self) -> float:
        """Fraction of the latest batch whose weight is exactly 0."""
        return float((self.last_weights == 0).float().mean()) if self.last_weights is not None else 0.0

    @property
    def last_entropy(self) -> float:
        """Entropy of the latest weights w/B divided by log B (1: uniform, 0: one sample)."""
        return normalised_entropy(self.last_weights) if self.last_weights is not None else 1.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(gamma={self.gamma}, leave_one_out={self.leave_one_out})"


class GASW(_CosineWeighting):
    """Gradient-alignment sample weighting: w_i = max(0, s_i)^gamma, normalised to sum to B.

    Args:
        gamma: sharpness; 0 gives uniform weights (note 0^0 = 1). The seed tuned 2.09.
        leave_one_out: use s_i = cos(g_i, gbar_-i) with gbar_-i = (B gbar - g_i)/(B - 1),
            so that a sample with a large gradient does not align with itself through
            gbar. Off by default (faithful to the seed).

    Attributes:
        steps: batches weighted so far.
        fallbacks: steps that fell back to uniform weights (reading it waits for the device).
        last_weights: (B,) the latest batch's weights.
        last_zero_fraction: fraction of the latest weights that are exactly 0 (computed when read).
        last_entropy: entropy of the latest w/B divided by log B, 1 for uniform weights
            (computed when read).
    """

    def _raw(self, cosines: Tensor) -> Tensor:
        return cosines.clamp(0.0, 1.0).pow(self.gamma)


class GDSW(_CosineWeighting):
    """Gradient-diversity sample weighting: w_i = (1 - s_i)^gamma, normalised to sum to B.

    Same arguments and attributes as GASW.
    """

    def _raw(self, cosines: Tensor) -> Tensor:
        return (1 - cosines.clamp(-1.0, 1.0)).pow(self.gamma)


def _global_batch(stats) -> int:
    """B over every rank's samples (GradientStats.global_batch_size; batch_size otherwise)."""
    return getattr(stats, "global_batch_size", stats.batch_size)


def leave_one_out_cosines(stats: GradientStats) -> Tensor:
    """(B,) cos(g_i, gbar_-i), gbar_-i = (B gbar - g_i)/(B - 1), from norms and <g_i, gbar>.

    <g_i, gbar_-i> = (B <g_i, gbar> - |g_i|^2) / (B - 1)
    |gbar_-i|^2    = (B^2 |gbar|^2 - 2 B <g_i, gbar> + |g_i|^2) / (B - 1)^2
    A batch of one has no reference: its cosine is 0. Data parallel: B and gbar are global.
    The cosine is a ratio of squares, formed from GradientStats.scaled_sums (one common scale).
    """
    B = _global_batch(stats)
    if B < 2:
        return torch.zeros_like(stats.norms)
    if hasattr(stats, "scaled_sums"):  # |g_i|^2, <g_i, S>, |S|^2 over one common scale^2: no overflow
        sq, dots_sum, sum_sq = (t.double() for t in stats.scaled_sums())
        dots, mean_sq = dots_sum / B, sum_sq / (B * B)
    else:
        dots, sq, mean_sq = stats.dots_with_mean.double(), stats.sq_norms.double(), stats.mean_grad_sq_norm.double()
    dot_loo = (B * dots - sq) / (B - 1)
    ref_sq = ((B * B * mean_sq - 2 * B * dots + sq) / (B - 1) ** 2).clamp_min(0)
    denominator = (sq.clamp_min(0) * ref_sq).sqrt()
    cos = torch.where(denominator > 0, dot_loo / denominator.clamp_min(1e-300), torch.zeros_like(dots))
    return cos.to(stats.norms.dtype)


def normalised_entropy(weights: Tensor) -> float:
    """Entropy of p = w / sum(w) divided by log B: 1 for uniform weights, 0 for one sample."""
    B = weights.numel()
    if B < 2:
        return 1.0
    p = weights.double() / weights.double().sum()
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum()
    return float(entropy / math.log(B))

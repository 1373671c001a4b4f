"""GAGA: gradient accumulation until the gradient signal-to-noise ratio is high enough.

Feed increments of samples (default 32); after each, the running per-parameter mean m_j and
unbiased variance v_j of the per-sample gradients over the n samples so far are updated
(from sum g and sum g^2, in float64). The optimizer steps when the rule passes or
max_samples (default 512) samples were used (seed: gaga_experiment.md; METHODS.md).

rule="mean_snr" (default, principled): the SNR of the accumulated MEAN gradient,
    bias-corrected and aggregated as a ratio of sums over parameters:
        snr = (|m|^2 - sum_j v_j / n) / (sum_j v_j / n)
    Since E|m|^2 = |mu|^2 + tr(Sigma)/n this estimates |mu|^2 / (tr(Sigma)/n), which GROWS
    with n: the norm test of Byrd et al. (2012) / Big Batch SGD, n / B_simple with the
    gradient noise scale B_simple = tr(Sigma)/|mu|^2 (McCandlish et al. 2018). Parameters
    with v_j = 0 add nothing to either sum, so dead parameters need no mask; when every
    v_j = 0 the signal is exact and the rule passes.
rule="per_sample" (the seed's wording): snr = mean_j m_j^2 / (v_j + eps). Its plug-in
    value is about r_j + 1/n and FALLS towards r_j as n grows, so it mostly stops at the
    first increment or runs to the cap (METHODS.md, the pitfall). Parameters with v_j = 0
    give m_j^2 / eps (huge when m_j != 0, 0 when m_j = 0): eps decides, as in the seed.
"""
from __future__ import annotations

import torch

from gradalign.engine.stats import GradientStats

RULES = ("mean_snr", "per_sample")


class GSNRAccumulator:
    """Accumulate per-sample gradient statistics until the GSNR rule passes.

    Example:
        acc = GSNRAccumulator(tau=0.1)
        for x, y in increments:                       # batches of acc.increment samples
            stats = engine.backward(F.cross_entropy(model(x), y, reduction="none"))
            if acc.update(stats):                     # p.grad = mean over all accumulated samples
                optimizer.step()

    Args:
        tau: threshold on the aggregated SNR.
        increment: samples per increment, for the loop that feeds update().
        max_samples: cap; the step is taken once this many samples were used.
        rule: "mean_snr" (default) or "per_sample" (faithful); see the module docstring.
        eps: added to v_j in the per_sample rule.
    Attributes:
        samples_per_step: samples used by every completed step; snr_per_step: the SNR
        at which each step was taken; last_snr: the SNR after the latest update().
    """

    def __init__(self, tau: float = 0.1, *, increment: int = 32, max_samples: int = 512,
                 rule: str = "mean_snr", eps: float = 1e-12):
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if not (isinstance(increment, int) and increment >= 1):
            raise ValueError(f"increment must be a positive integer, got {increment!r}")
        if not (isinstance(max_samples, int) and max_samples >= increment):
            raise ValueError(f"max_samples must be an integer >= increment ({increment}), got {max_samples!r}")
        if not isinstance(tau, (int, float)) or tau != tau:
            raise ValueError(f"tau must be a number (the bias-corrected mean_snr can be negative), got {tau!r}")
        self.tau, self.increment, self.max_samples, self.rule, self.eps = tau, increment, max_samples, rule, eps
        self.samples_per_step: list[int] = []
        self.snr_per_step: list[float] = []
        self.last_snr = float("nan")
        self._reset()

    def _reset(self) -> None:
        self.n = 0
        self._sum: dict[str, torch.Tensor] = {}
        self._sum_sq: dict[str, torch.Tensor] = {}

    def update(self, stats: GradientStats) -> bool:
        """Add one increment; write p.grad = mean over the samples so far in this step.

        Returns True when the optimizer should step now (rule passed or cap reached); the
        next update() then starts a new accumulation.
        """
        B = stats.batch_size
        for name, total in stats.grad_sum.items():
            add, add_sq = total.double(), stats.grad_sq_sum[name].double()
            self._sum[name] = self._sum[name] + add if name in self._sum else add
            self._sum_sq[name] = self._sum_sq[name] + add_sq if name in self._sum_sq else add_sq
        self.n += B
        for name, p in stats.parameters.items():
            p.grad = (self._sum[name] / self.n).to(p.dtype)
        self.last_snr = self.snr()
        ready = self.n >= self.max_samples or self.last_snr > self.tau
        if ready:
            self.samples_per_step.append(self.n)
            self.snr_per_step.append(self.last_snr)
            self._reset()
        return ready

    def snr(self) -> float:
        """The aggregated SNR of the samples accumulated so far (nan before two samples)."""
        n = self.n
        if n < 2:
            return float("nan")
        mean_sq, var_total, per_sample, count = 0.0, 0.0, 0.0, 0
        for name, total in self._sum.items():
            m = total / n
            v = ((self._sum_sq[name] - n * m.square()) / (n - 1)).clamp_min(0)
            if self.rule == "mean_snr":
                mean_sq += float(m.square().sum())
                var_total += float(v.sum())
            else:
                per_sample += float((m.square() / (v + self.eps)).sum())
                count += m.numel()
        if self.rule == "per_sample":
            return per_sample / max(count, 1)
        noise = var_total / n
        return float("inf") if noise == 0 else (mean_sq - noise) / noise

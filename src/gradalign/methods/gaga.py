"""GAGA: gradient accumulation until the gradient signal-to-noise ratio is high enough.

Feed increments of samples (default 32); after each, the running per-parameter mean m_j and
unbiased variance v_j of the per-sample gradients over the n samples so far are updated
(from sum g and sum g^2, in float64). The optimizer steps when the rule passes or
max_samples (default 512) samples were used. The accumulator only reads statistics: the
engine writes its accumulated mean into p.grad (`engine.set_grad(acc.mean_grad())`).

rule="mean_snr" (default, principled): the SNR of the accumulated MEAN gradient,
    bias-corrected and aggregated as a ratio of sums over parameters:
        snr = (|m|^2 - sum_j v_j / n) / (sum_j v_j / n)
    Since E|m|^2 = |mu|^2 + tr(Sigma)/n this estimates |mu|^2 / (tr(Sigma)/n), which GROWS
    with n: the norm test of Byrd et al. (2012) / Big Batch SGD, n / B_simple with the
    gradient noise scale B_simple = tr(Sigma)/|mu|^2 (McCandlish et al. 2018). Parameters
    with v_j = 0 add nothing to either sum, so dead parameters need no mask; when every
    v_j = 0 the signal is exact and the rule passes.
rule="per_sample" (the GAGA proposal's wording): snr = mean_j m_j^2 / (v_j + eps). Since
    E[m_j^2] = mu_j^2 + sigma_j^2 / n, its plug-in value is about r_j + 1/n and FALLS towards
    r_j as n grows, so it mostly stops at the first increment or runs to the cap. Parameters
    with v_j = 0 give m_j^2 / eps (huge when m_j != 0, 0 when m_j = 0): eps decides.

Data parallel: give the ENGINE the process group (`PerSampleGradients(model,
process_group=...)`); its statistics then carry sum g and sum g**2 over every rank's
samples (one all-reduce of 2P + 1 numbers per increment, via `GradientStats.moment_sums`)
and the global sample count, so every rank's accumulator holds the same sums, takes the
same decision at the same SNR, and `mean_grad()` is the same on every rank: exactly a
single process fed the concatenated increments. An increment is then the global batch
(e.g. 2 ranks x 16 samples for increment=32). A sharded model (FSDP2): the sums are DTensor
shards (a reduce-scatter of 2P + 1 per increment), each rank accumulates its parts, the SNR's
sums over parameters take one scalar all-reduce, and `mean_grad()` is shards for set_grad.

References: Byrd, Chin, Nocedal, Wu, "Sample size selection in optimization methods for
machine learning", Math. Programming 2012; McCandlish, Kaplan, Amodei, "An Empirical Model
of Large-Batch Training", arXiv:1812.06162; Liu et al., "Understanding Why Neural Networks
Generalize Well Through GSNR of Parameters", ICLR 2020 (the per-parameter GSNR).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from gradalign.engine.distributed import global_sums
from gradalign.engine.gradient_stats import GradientStats

SNR_RULES = ("mean_snr", "per_sample")


class GSNRAccumulator:
    """Accumulate per-sample gradient statistics until the GSNR rule passes.

    Example:
        ```python
        acc = GSNRAccumulator(tau=0.1)
        for x, y in increments:                       # batches of acc.increment samples
            losses = F.cross_entropy(model(x), y, reduction="none")
            stats = engine.backward(losses, write_grad=False)
            if acc.update(stats):                     # the rule passed or the cap was reached
                engine.set_grad(acc.mean_grad())      # p.grad = mean over all accumulated samples
                optimizer.step(); optimizer.zero_grad()
        ```

    Args:
        tau: threshold on the aggregated SNR.
        increment: samples per increment: the batch size of the loop that feeds update().
        max_samples: cap; the step is taken once this many samples were used.
        rule: "mean_snr" (default): the bias-corrected SNR of the accumulated mean gradient,
            (|m|^2 - sum_j v_j / n) / (sum_j v_j / n), which grows with n; or "per_sample"
            (the proposal's wording): mean_j m_j^2 / (v_j + eps), which falls as samples
            accumulate, so it mostly stops at the first increment or runs to the cap.
        eps: added to v_j in the per_sample rule, a number >= 0.

    Attributes:
        samples_per_step: samples used by every completed step.
        snr_per_step: the SNR at which each step was taken.
        last_snr: the SNR after the latest update().
    """

    def __init__(self, tau: float = 0.1, *, increment: int = 32, max_samples: int = 512,
                 rule: str = "mean_snr", eps: float = 1e-12):
        if rule not in SNR_RULES:
            raise ValueError(f"rule must be one of {SNR_RULES}, got {rule!r}")
        if not (isinstance(increment, int) and increment >= 1):
            raise ValueError(f"increment must be a positive integer, got {increment!r}")
        if not (isinstance(max_samples, int) and max_samples >= increment):
            raise ValueError(f"max_samples must be an integer >= increment ({increment}), got {max_samples!r}")
        if not isinstance(tau, (int, float)) or tau != tau:
            raise ValueError(f"tau must be a number (the bias-corrected mean_snr can be negative), got {tau!r}")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        self.tau, self.increment, self.max_samples, self.rule, self.eps = tau, increment, max_samples, rule, eps
        self.samples_per_step: list[int] = []
        self.snr_per_step: list[float] = []
        self.last_snr = float("nan")
        self.reset()

    def reset(self) -> None:
        """Start a new accumulation (update() does this itself after a step)."""
        self.n = 0
        self._closed = False
        self._sum: dict[str, Tensor] = {}
        self._sum_sq: dict[str, Tensor] = {}
        self._count: dict[str, int] = {}  # samples over which each parameter was trainable
        self._dtype: dict[str, torch.dtype] = {}

    def update(self, stats: GradientStats) -> bool:
        """Add one increment's statistics (sum g_i and sum g_i**2 per parameter).

        Each parameter's mean and variance are over the samples of the increments in which it
        was trainable (`stats.trainable_names`): a parameter that takes no part in an
        increment's losses counts those samples with a zero gradient, one frozen in the middle of
        an accumulation leaves it (its partial sums are dropped: it is not written by
        `mean_grad()`), one unfrozen in the middle counts from then on.

        Returns True when the optimizer should step now (rule passed or cap reached): then
        `mean_grad()` is the mean over the accumulation just closed, and the next update()
        starts a new one.
        """
        if self._closed:
            self.reset()
        moments = getattr(stats, "moment_sums", None)   # one all-reduce for both under data parallel
        sums, sq_sums = moments() if moments is not None else (stats.grad_sum, stats.grad_sq_sum)
        trainable = tuple(getattr(stats, "trainable_names", None) or sums)
        for name in [n for n in self._count if n not in trainable]:  # frozen since the accumulation began
            for table in (self._sum, self._sum_sq, self._count, self._dtype):
                table.pop(name, None)
        B = getattr(stats, "global_batch_size", stats.batch_size)
        for name in trainable:
            self._count[name] = self._count.get(name, 0) + B
        for name, total in sums.items():
            add, add_sq = total.double(), sq_sums[name].double()
            self._dtype[name] = total.dtype
            self._count.setdefault(name, B)
            self._sum[name] = self._sum[name] + add if name in self._sum else add
            self._sum_sq[name] = self._sum_sq[name] + add_sq if name in self._sum_sq else add_sq
        self.n += B
        self.last_snr = self.snr()
        ready = self.n >= self.max_samples or self.last_snr > self.tau
        if ready:
            self.samples_per_step.append(self.n)
            self.snr_per_step.append(self.last_snr)
            self._closed = True
        return ready

    def state_dict(self) -> dict:
        """Everything update() has accumulated, for a checkpoint taken at any point (also in the
        middle of an accumulation): the running float64 sums (2P numbers), the sample count and
        the history of steps. Loading it (with torch.load's map_location on the device the
        statistics live on) continues exactly as if never stopped."""
        return {"n": self.n, "closed": self._closed, "sum": dict(self._sum), "sum_sq": dict(self._sum_sq),
                "count": dict(self._count),  # samples per parameter (those trainable in part of it)
                "dtype": {name: str(dtype).removeprefix("torch.") for name, dtype in self._dtype.items()},
                "samples_per_step": list(self.samples_per_step), "snr_per_step": list(self.snr_per_step),
                "last_snr": self.last_snr}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() gave (the settings tau, increment, ... stay this object's)."""
        self.n, self._closed = int(state["n"]), bool(state["closed"])
        self._sum, self._sum_sq = dict(state["sum"]), dict(state["sum_sq"])
        self._count = {name: int(c) for name, c in state.get("count", dict.fromkeys(self._sum, self.n)).items()}
        self._dtype = {name: getattr(torch, dtype) for name, dtype in state["dtype"].items()}
        self.samples_per_step = [int(n) for n in state["samples_per_step"]]
        self.snr_per_step = [float(s) for s in state["snr_per_step"]]
        self.last_snr = float(state["last_snr"])

    def mean_grad(self) -> dict[str, Tensor]:
        """{param name: mean gradient over the samples of the current accumulation in which the
        parameter was trainable}, in the gradients' dtype; for `engine.set_grad`. Empty before
        the first update()."""
        return {name: (total / self._count[name]).to(self._dtype[name]) for name, total in self._sum.items()}

    def snr(self) -> float:
        """The aggregated SNR of the samples accumulated so far (nan before two samples); each
        parameter's mean m_j and variance v_j over its own n_j samples (n_j = n unless it was
        frozen or unfrozen during the accumulation)."""
        if self.n < 2:
            return float("nan")
        terms, count = [], 0  # elementwise terms, summed over their elements below
        for name, total in self._sum.items():
            n = self._count[name]
            if n < 2:
                continue
            m = total / n
            v = ((self._sum_sq[name] - n * m.square()) / (n - 1)).clamp_min(0)
            terms.extend([m.square(), v / n] if self.rule == "mean_snr" else [m.square() / (v + self.eps)])
            count += m.numel()
        sums = global_sums(terms)  # one host read; sharded sums (DTensors): their shards' sums all-reduced
        if self.rule == "per_sample":
            return float(sums.sum()) / max(count, 1)
        mean_sq, noise = float(sums[0::2].sum()), float(sums[1::2].sum())  # sum_j |m_j|^2, sum_j v_j / n_j
        return float("inf") if noise == 0 else (mean_sq - noise) / noise

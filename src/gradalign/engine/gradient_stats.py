"""GradientStats: per-sample gradient statistics, each computed on first access.

Shapes: B samples; g_i the gradient of losses[i] over all trainable parameters;
gbar = (1/B) sum_i g_i. Every quantity over samples is a sum of per-parameter terms
(|g_i|^2, <g_i, S>, |S|^2 with S = sum_i g_i); the cosines are the one ratio formed here.
Methods form their own ratios (GASW's normalised weights, GAGA's SNR) from these sums.
Everything is computed in float32 (float64 for a float64 model), with autocast off, even
when the model ran in bfloat16 or float16 or a statistic is read inside an autocast region.
"""
from __future__ import annotations

import functools
from functools import cached_property

import torch
from torch import Tensor

from gradalign.engine.persample import PerSampleGrad, full_precision


def _full_precision(method):
    """Run a statistic with autocast off on the statistics' device."""
    @functools.wraps(method)
    def wrapper(self, *args):
        with full_precision(self._device):
            return method(self, *args)
    return wrapper


class GradientStats:
    """Statistics of the per-sample gradients of one `PerSampleGradients.backward` call.

    Attributes (lazy):
        batch_size: B.
        grad_sum, mean_grad: {param name: S = sum_i g_i} and gbar = S / B, for every
            parameter that took part in the losses.
        sq_norms, norms: (B,) |g_i|^2 and |g_i|.
        dots_with_mean: (B,) <g_i, gbar>.
        mean_grad_sq_norm: () |gbar|^2.
        cosines: (B,) cos(g_i, gbar); 0 where |g_i| or |gbar| is 0.
        grad_sq_sum: {param name: sum_i g_i**2}, elementwise.
        weights: (B,) the weights p.grad was formed with (ones when none were given).

    A read-only result: it holds the factored per-sample gradients, not the model, so only
    the engine writes p.grad.
    """

    def __init__(self, per_sample: dict[str, PerSampleGrad], batch_size: int, *,
                 device: torch.device | None = None):
        self._per_sample = per_sample
        self._device = device
        self.batch_size = batch_size
        self.weights: Tensor | None = None

    def _sum_over_params(self, term) -> Tensor:
        total = None
        for name, grads in self._per_sample.items():
            value = term(name, grads)
            total = value if total is None else total + value
        if total is None:  # no trainable parameter took part in the loss
            return torch.zeros(self.batch_size, device=self._device)
        return total

    @cached_property
    @_full_precision
    def sq_norms(self) -> Tensor:
        return self._sum_over_params(lambda _, g: g.sq_norms())

    @cached_property
    @_full_precision
    def norms(self) -> Tensor:
        return self.sq_norms.clamp_min(0).sqrt()

    @cached_property
    @_full_precision
    def grad_sum(self) -> dict[str, Tensor]:
        """{param name: S = sum_i g_i}, formed only for routes that need it."""
        return {name: g.weighted_sum(None) for name, g in self._per_sample.items()}

    @cached_property
    @_full_precision
    def mean_grad(self) -> dict[str, Tensor]:
        return {name: s / self.batch_size for name, s in self.grad_sum.items()}

    def _sum_of(self, name: str):
        return lambda: self.grad_sum[name]

    @cached_property
    @_full_precision
    def dots_with_mean(self) -> Tensor:
        """<g_i, gbar> = <g_i, S> / B."""
        return self._sum_over_params(lambda name, g: g.dots_with_sum(self._sum_of(name))) / self.batch_size

    @cached_property
    @_full_precision
    def mean_grad_sq_norm(self) -> Tensor:
        """|gbar|^2 = |S|^2 / B^2, S the sum over samples of every parameter's gradient."""
        terms = [g.sum_sq_norm(self._sum_of(name)) for name, g in self._per_sample.items()]
        if not terms:
            return torch.zeros((), device=self._device)
        return torch.stack(terms).sum() / self.batch_size ** 2

    @cached_property
    @_full_precision
    def cosines(self) -> Tensor:
        denominator = self.norms * self.mean_grad_sq_norm.sqrt()
        ok = denominator > 0
        return torch.where(ok, self.dots_with_mean / torch.where(ok, denominator, 1.0), 0.0)

    @cached_property
    @_full_precision
    def grad_sq_sum(self) -> dict[str, Tensor]:
        return {name: g.sq_sum() for name, g in self._per_sample.items()}

    @_full_precision
    def dots(self, reference: dict[str, Tensor]) -> Tensor:
        """(B,) <g_i, R> for a reference gradient R given as {param name: tensor}."""
        return self._sum_over_params(lambda name, g: g.dots(reference[name]))

    @_full_precision
    def weighted_sum(self, w: Tensor | None) -> dict[str, Tensor]:
        """{param name: sum_i w_i g_i} for weights w of shape (B,) (None: all ones)."""
        return {name: g.weighted_sum(w) for name, g in self._per_sample.items()}

"""GradientStats: per-sample gradient statistics, each computed on first access.

Shapes: B samples; g_i the gradient of losses[i] over all trainable parameters;
gbar = (1/B) sum_i g_i. Every quantity over samples is a sum of per-parameter terms
(|g_i|^2, <g_i, S>, |S|^2 with S = sum_i g_i); the cosines are the one ratio formed here.
Methods form their own ratios (GASW's normalised weights, GAGA's SNR) from these sums.

Data parallel (`process_group` given): the sums over samples (S, sum_i g_i**2, the weighted
sum, B) are summed over the ranks here, once each and flattened into one all-reduce per
call (`engine/distributed.py` lists the calls per step), so every ratio below is formed
from global sums in this one place; per-sample quantities (norms, <g_i, S>, cosines)
stay with the rank that holds the sample. Every rank must read the same statistics in
the same order (the collectives are issued on first access); the engine and the methods do.

Everything is computed in float32 (float64 for a float64 model), with autocast off, even
when the model ran in bfloat16 or float16 or a statistic is read inside an autocast region.
"""
from __future__ import annotations

import functools
from functools import cached_property

import torch
from torch import Tensor

from gradalign.engine import distributed as dist_
from gradalign.engine.persample import PerSampleGrad, _sq_norm, full_precision


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

    With a process group (data parallel), batch_size, norms, cosines and weights are this
    rank's samples'; global_batch_size is B over all ranks, and grad_sum, mean_grad,
    mean_grad_sq_norm, grad_sq_sum and weighted_sum() are over every rank's samples, the
    same on every rank; cosines are to that global mean.
    """

    def __init__(self, per_sample: dict[str, PerSampleGrad], batch_size: int, *,
                 device: torch.device | None = None, process_group=None,
                 param_shapes: dict[str, tuple[torch.Size, torch.dtype]] | None = None):
        self._per_sample = per_sample
        self._device = device
        self.batch_size = batch_size
        self.weights: Tensor | None = None
        self.process_group = process_group
        # every rank reduces the same names in the same order, zeros for a parameter that
        # took no part in this rank's losses
        self._shapes = param_shapes or {}
        self._global_batch: int | None = None if process_group is not None else batch_size
        self._sq_sum_reduced: dict[str, Tensor] | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The precision of the statistics: float32, or float64 for a float64 model."""
        return functools.reduce(torch.promote_types, (g.dtype for g in self._per_sample.values()), torch.float32)

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

    # ------------------------------------------------------------ sums over ranks

    def _complete(self, local: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every reduced name in a fixed order, zeros where this rank has no contribution."""
        out = {}
        for name, (shape, dtype) in self._shapes.items():
            out[name] = local[name] if name in local else torch.zeros(shape, dtype=dtype, device=self._device)
        return out

    def _reduce(self, *local: dict[str, Tensor], count: bool) -> list[dict[str, Tensor]]:
        reduced, total = dist_.all_reduce_dicts([self._complete(d) for d in local],
                                                self.batch_size if count else None,
                                                self.process_group, self._device)
        if count:
            self._global_batch = total
        return reduced

    @cached_property
    @_full_precision
    def local_grad_sum(self) -> dict[str, Tensor]:
        """{param name: sum_i g_i} over this rank's samples (= grad_sum without a group)."""
        return {name: g.weighted_sum(None) for name, g in self._per_sample.items()}

    @cached_property
    @_full_precision
    def grad_sum(self) -> dict[str, Tensor]:
        """{param name: S = sum_i g_i}, formed only for routes that need it; over every
        rank's samples with a process group (one all-reduce of P + 1 numbers, B included)."""
        if self.process_group is None:
            return self.local_grad_sum
        return self._reduce(self.local_grad_sum, count=True)[0]

    @property
    def global_batch_size(self) -> int:
        """B summed over ranks (batch_size without a process group)."""
        if self._global_batch is None:
            self.grad_sum  # noqa: B018 - the count travels with S
        return self._global_batch

    def sum_over_ranks(self, value: Tensor) -> Tensor:
        """`value` summed over the ranks (itself without a process group): for methods that
        form a ratio of their own from per-sample terms, e.g. GASW's normaliser sum_i w_i."""
        if self.process_group is None:
            return value
        return dist_.all_reduce_flat([value], self.process_group)[0]

    @cached_property
    @_full_precision
    def mean_grad(self) -> dict[str, Tensor]:
        return {name: s / self.global_batch_size for name, s in self.grad_sum.items()}

    def _sum_of(self, name: str):
        return lambda: self.grad_sum[name]

    @cached_property
    @_full_precision
    def dots_with_mean(self) -> Tensor:
        """<g_i, gbar> = <g_i, S> / B. With a process group, S is global, so it comes from the
        factors (d_i^T S a_i): the Gram route only pairs this rank's samples."""
        if self.process_group is None:
            return self._sum_over_params(lambda name, g: g.dots_with_sum(self._sum_of(name))) / self.batch_size
        return self._sum_over_params(lambda name, g: g.dots(self.grad_sum[name])) / self.global_batch_size

    @cached_property
    @_full_precision
    def mean_grad_sq_norm(self) -> Tensor:
        """|gbar|^2 = |S|^2 / B^2, S the sum over samples of every parameter's gradient."""
        if self.process_group is None:
            terms = [g.sum_sq_norm(self._sum_of(name)) for name, g in self._per_sample.items()]
        else:
            terms = [_sq_norm(s) for s in self.grad_sum.values()]
        if not terms:
            return torch.zeros((), device=self._device)
        return torch.stack(terms).sum() / self.global_batch_size ** 2

    @cached_property
    @_full_precision
    def cosines(self) -> Tensor:
        denominator = self.norms * self.mean_grad_sq_norm.sqrt()
        ok = denominator > 0
        return torch.where(ok, self.dots_with_mean / torch.where(ok, denominator, 1.0), 0.0)

    @cached_property
    @_full_precision
    def grad_sq_sum(self) -> dict[str, Tensor]:
        """{param name: sum_i g_i**2}; over every rank's samples with a process group."""
        local = {name: g.sq_sum() for name, g in self._per_sample.items()}
        if self.process_group is None:
            return local
        if "grad_sum" in self.__dict__:
            return self._reduce(local, count=False)[0]
        return self.moment_sums()[1]

    @_full_precision
    def moment_sums(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(grad_sum, grad_sq_sum), with a process group reduced together in ONE all-reduce of
        2P + 1 numbers when neither was reduced yet (what GSNRAccumulator reads)."""
        if self.process_group is not None and "grad_sum" not in self.__dict__ \
                and "grad_sq_sum" not in self.__dict__:
            local_sq = {name: g.sq_sum() for name, g in self._per_sample.items()}
            self.__dict__["grad_sum"], self.__dict__["grad_sq_sum"] = self._reduce(
                self.local_grad_sum, local_sq, count=True)
        return self.grad_sum, self.grad_sq_sum

    @_full_precision
    def dots(self, reference: dict[str, Tensor]) -> Tensor:
        """(B,) <g_i, R> for a reference gradient R given as {param name: tensor}."""
        return self._sum_over_params(lambda name, g: g.dots(reference[name]))

    @_full_precision
    def weighted_sum(self, w: Tensor | None) -> dict[str, Tensor]:
        """{param name: sum_i w_i g_i} for weights w of shape (B,) (None: all ones). With a
        process group each rank passes its own samples' weights and gets the sum over every
        rank's samples (one all-reduce of P numbers)."""
        local = {name: g.weighted_sum(w) for name, g in self._per_sample.items()}
        if self.process_group is None:
            return local
        return self._reduce(local, count=False)[0]

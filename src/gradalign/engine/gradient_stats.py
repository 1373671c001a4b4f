"""GradientStats: per-sample gradient statistics, each computed on first access.

Shapes: B samples; g_i the gradient of losses[i] over all trainable parameters;
gbar = (1/B) sum_i g_i. Every quantity over samples is a sum of per-parameter terms
(|g_i|^2, <g_i, S>, |S|^2 with S = sum_i g_i); the cosines are the one ratio formed here.
Methods form their own ratios (GASW's normalised weights, GAGA's SNR) from these sums.
The parameters are served in units (`engine/units.py`: a layer's weight and bias together,
all small dense parameters in one block), so each statistic is a few operator calls per layer.

Scale: the engine divides every output gradient of one backward by one power of two, `scale`
(from their largest magnitude), before the per-sample representations are built, so the
representations hold g_i / scale and every square (|a|^2 |d|^2, Gram products, |S|^2) is
formed near 1: losses scaled by 1e20 or 1e-30 in float32 give the same cosines and weights,
and norms correct to float32, although |g_i|^2 itself would overflow or underflow. The scale
is undone once per result (norms times scale, p.grad from the weights times scale); results
that are squares (sq_norms, dots_with_mean, mean_grad_sq_norm, grad_sq_sum) are exact
multiples by scale^2 and overflow only where the true value does not fit the dtype.

Data parallel (`process_group` given): the sums over samples (S, sum_i g_i**2, the weighted
sum, B) are summed over the ranks here, once each and flattened into one all-reduce per
call (`engine/distributed/ddp.py` lists the calls per step), so every ratio below is formed
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
from gradalign.engine import units as units_
from gradalign.engine.phases import Trace, TracedUnit
from gradalign.engine.representations import PerSampleGrad, in_full_precision as _full_precision
from gradalign.errors import GradAlignError


class GradientStats:
    """Statistics of the per-sample gradients of one `PerSampleGradients.backward` call.

    Every attribute is computed when first read (lazy).

    Attributes:
        batch_size (int): B.
        grad_sum: {param name: S = sum_i g_i}, for every parameter that took part in the losses.
        mean_grad: {param name: gbar = S / B}.
        sq_norms: (B,) |g_i|^2.
        norms: (B,) |g_i|.
        dots_with_mean: (B,) <g_i, gbar>.
        mean_grad_sq_norm: () |gbar|^2.
        mean_grad_norm: () |gbar|.
        cosines: (B,) cos(g_i, gbar); 0 where |g_i| or |gbar| is 0.
        grad_sq_sum: {param name: sum_i g_i**2}, elementwise.
        weights (Tensor): (B,) the weights p.grad was formed with (ones when none were given).
        trainable_names (tuple): every trainable parameter's name (set by the engine), also those not in the losses.
        scale (Tensor): () the power of two the representations are divided by, so that every square
            is formed near 1 (losses scaled by 1e20 or 1e-30 give the same cosines and weights).

    A read-only result: it holds the factored per-sample gradients, not the model, so only
    the engine writes p.grad. After `engine.backward(..., release=True)` it holds them no more:
    the statistics read before (by the weighting) stay, any other raises GradAlignError.

    With a process group (data parallel), batch_size, norms, cosines and weights are this
    rank's samples'; global_batch_size is B over all ranks, and grad_sum, mean_grad,
    mean_grad_sq_norm, grad_sq_sum and weighted_sum() are over every rank's samples, the
    same on every rank; cosines are to that global mean.
    """
    process_group = dist_.WeakGroup()  # held weakly: statistics never keep a destroyed group alive

    def __init__(self, per_sample: dict[str, PerSampleGrad], batch_size: int, *,
                 device: torch.device | None = None, process_group=None, inputs=None,
                 param_shapes: dict[str, tuple[torch.Size, torch.dtype]] | None = None,
                 scale: Tensor | None = None, sums: dict[str, Tensor] | None = None, trace: Trace = None):
        self._per_sample, self._inputs = per_sample, inputs  # inputs: what they read (guards/inputs.py), or None
        self._given = sums or {}  # {name: S} that autograd formed in the backward (unscaled)
        units = units_.plan(per_sample)
        self._live_units: list | None = units if trace is None else [TracedUnit(u, trace) for u in units]  # None: released
        self._device, self._scale = device, scale  # scale None: the representations hold g_i itself
        self.batch_size, self.weights, self.process_group = batch_size, None, process_group
        # every rank reduces the same names in the same order, zeros where this rank's losses had no part
        self._shapes = param_shapes or {}
        self._global_batch: int | None = None if process_group is not None else batch_size
        self._gram: tuple[Tensor, list] | None = None  # (K, its units) once the cosines used it

    @property
    def _units(self) -> list:
        if self._live_units is None:
            raise GradAlignError(
                "this statistic was not read before the per-sample gradients of its backward were released "
                "(engine.backward(..., release=True) frees them as p.grad is written): read it inside the "
                "weighting callable, which sees the statistics first, or call backward without release=True")
        if self._inputs is not None:  # layer inputs the caller may have changed in place since the backward
            self._inputs.check("after the backward, before this statistic was first read")
        return self._live_units

    @cached_property
    def dtype(self) -> torch.dtype:
        """The precision of the statistics: float32, or float64 for a float64 model."""
        return functools.reduce(torch.promote_types, {g.dtype for g in self._per_sample.values()}, torch.float32)

    @property
    def scale(self) -> Tensor:
        return self._scale if self._scale is not None else torch.ones((), device=self._device)

    def _zeros(self) -> Tensor:
        return torch.zeros(self.batch_size, device=self._device, dtype=self.dtype)

    def _by_name(self, per_unit) -> dict[str, Tensor]:
        """{name: tensor} from a function unit -> [tensor per name], over every unit."""
        return {name: t for unit in self._units for name, t in zip(unit.names, per_unit(unit))}

    def _unscaled(self, tensors: dict[str, Tensor], power: int = 1, divide: float = 1.0) -> dict[str, Tensor]:
        """{name: t * scale**power / divide} in one operator call (new tensors; the same ones
        when there is nothing to multiply)."""
        if not tensors:
            return {}
        factor = 1.0 / divide if self._scale is None or power == 0 else (self._scale ** power) / divide
        if isinstance(factor, float) and factor == 1.0:
            return tensors
        return dict(zip(tensors, torch._foreach_mul(list(tensors.values()), factor)))

    # ------------------------------------------------------------ per sample (scaled)

    @cached_property
    @_full_precision
    def _sq_norms(self) -> Tensor:
        """(B,) |g_i|^2 / scale^2; the Gram route's diagonal where the cosines formed it."""
        if self._gram is not None:
            K, gram_units = self._gram
            terms = [K.diagonal()] + [u.sq_norms() for u in self._units if not any(u is g for g in gram_units)]
        else:
            terms = [u.sq_norms() for u in self._units]
        total = units_.add_all(terms)
        return self._zeros() if total is None else total

    @cached_property
    @_full_precision
    def _norms(self) -> Tensor:
        return self._sq_norms.clamp_min(0).sqrt()

    @cached_property
    @_full_precision
    def sq_norms(self) -> Tensor:
        return self._sq_norms if self._scale is None else self._sq_norms * (self._scale * self._scale)

    @cached_property
    @_full_precision
    def norms(self) -> Tensor:
        return self._norms if self._scale is None else self._norms * self._scale

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
    def _local_sums(self) -> dict[str, Tensor]:
        """{name: S / scale} over this rank's samples: S as autograd gave it where it did (one
        operator call rescales them all), else formed once per unit from its factors."""
        out = {}
        for unit in self._units:
            if all(n in self._given for n in unit.names):
                continue
            out.update(zip(unit.names, unit.sums()))
        return {**self._given_scaled, **out}

    @cached_property
    def _given_scaled(self) -> dict[str, Tensor]:
        """{name: S / scale} for autograd's S, in one operator call."""
        return self._unscaled(self._given, power=-1) if self._given else {}

    def _unit_sums(self, unit) -> list[Tensor] | None:
        """The unit's S / scale if it exists already (autograd's, or formed before), else None."""
        if all(n in self._given for n in unit.names):
            return [self._given_scaled[n] for n in unit.names]
        if "_local_sums" in self.__dict__:
            return [self._local_sums[n] for n in unit.names]
        return None

    @cached_property
    @_full_precision
    def local_grad_sum(self) -> dict[str, Tensor]:
        """{param name: sum_i g_i} over this rank's samples (= grad_sum without a group)."""
        if self._given and all(n in self._given for n in self._per_sample):
            return dict(self._given)
        return self._unscaled(self._local_sums)

    @cached_property
    @_full_precision
    def grad_sum(self) -> dict[str, Tensor]:
        """{param name: S = sum_i g_i}; over every rank's samples with a process group (one
        all-reduce of P + 1 numbers, B included)."""
        if self.process_group is None:
            return self.local_grad_sum
        return self._reduce(self.local_grad_sum, count=True)[0]

    @property
    def global_batch_size(self) -> int:
        """B summed over ranks (batch_size without a process group); 0 for an empty batch, whose
        sums are zero and whose means are taken as zero too (divided by max(B, 1))."""
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
        if self.process_group is None:
            return self._unscaled(self.local_grad_sum, power=0, divide=self.batch_size)
        return self._unscaled(self.grad_sum, power=0, divide=max(self.global_batch_size, 1))

    def mean_update(self) -> dict[str, Tensor]:
        """Fresh tensors gbar for p.grad (never the cached statistics a caller may hold): the sum
        with every weight 1/B (the 1/B and the scale then multiply the narrower factor, not a
        parameter-sized result); with a process group, the global S / B."""
        if self.process_group is not None:
            return dict(zip(self.grad_sum, torch._foreach_div(list(self.grad_sum.values()), max(self.global_batch_size, 1))))
        return self.weighted_sum(None, factor=1.0 / self.batch_size)

    # ------------------------------------------------------------ <g_i, S>, |S|^2 (scaled)

    @cached_property
    @_full_precision
    def _cosine_terms(self) -> tuple[Tensor, Tensor]:
        """((B,) <g_i, S>, () |S|^2), both / scale^2. Each layer takes the cheapest of its Gram
        matrix (summed over layers into one (B, B) K), S with the factors, and its per-sample
        gradients formed once (units.Layer); with a process group S (and |S|^2, over every
        parameter) is global, and the Gram matrix, which pairs this rank's samples, is not used."""
        dots, squares, scalars = [], [], []
        if self.process_group is not None:
            reduced = self.grad_sum
            inv = None if self._scale is None else 1.0 / self._scale
            local = dict(zip(reduced, reduced.values() if inv is None else torch._foreach_mul(list(reduced.values()), inv)))
            for u in self._units:
                d, s = u.cosine_terms([local.pop(n) for n in u.names])
                dots.append(d)
                (squares.extend if isinstance(s, list) else scalars.append)(s)
            squares.extend(local.values())  # no unit here (an empty batch on this rank)
        else:
            K, gram_units = None, []
            for u in self._units:
                refs = self._unit_sums(u)
                if u.gram_is_cheaper(refs is not None):
                    K = u.add_gram(K)
                    gram_units.append(u)
                else:
                    d, s = u.cosine_terms(refs)
                    dots.append(d)
                    (squares.extend if isinstance(s, list) else scalars.append)(s)
            if K is not None:
                self._gram = (K, gram_units)
                row_sums = K.sum(1)
                dots.append(row_sums)
                scalars.append(row_sums.sum())
        sq = units_.sum_of_squares(squares)
        scalars = scalars + ([] if sq is None else [sq])
        total = units_.add_all(scalars)
        dots_total = units_.add_all(dots)
        return (self._zeros() if dots_total is None else dots_total,
                torch.zeros((), device=self._device, dtype=self.dtype) if total is None else total)

    @cached_property
    @_full_precision
    def dots_with_mean(self) -> Tensor:
        """<g_i, gbar> = <g_i, S> / B."""
        dots = self._cosine_terms[0]
        factor = 1.0 / max(self.global_batch_size, 1) if self._scale is None else self._scale ** 2 / max(self.global_batch_size, 1)
        return dots * factor

    @cached_property
    @_full_precision
    def mean_grad_sq_norm(self) -> Tensor:
        """|gbar|^2 = |S|^2 / B^2, S the sum over samples of every parameter's gradient."""
        sq = self._cosine_terms[1]
        factor = 1.0 / max(self.global_batch_size, 1) ** 2
        return sq * factor if self._scale is None else sq * (self._scale ** 2 * factor)

    @cached_property
    @_full_precision
    def mean_grad_norm(self) -> Tensor:
        """|gbar|, from the scaled |S|^2 (finite and non-zero whenever |gbar| itself fits)."""
        root = self._cosine_terms[1].clamp_min(0).sqrt()
        return root * ((1.0 if self._scale is None else self._scale) / max(self.global_batch_size, 1))

    @cached_property
    @_full_precision
    def cosines(self) -> Tensor:
        dots, sum_sq = self._cosine_terms  # first: the Gram route's diagonal then gives the norms
        denominator = self._norms * sum_sq.sqrt()  # NaN for a (rounding-)negative |S|^2: cosine 0
        return torch.where(denominator > 0, dots / denominator, 0.0)

    def scaled_sums(self) -> tuple[Tensor, Tensor, Tensor]:
        """(|g_i|^2, <g_i, S>, |S|^2), all divided by the same scale^2: for ratios such as the
        leave-one-out cosines, which then never overflow or underflow."""
        dots, sum_sq = self._cosine_terms
        return self._sq_norms, dots, sum_sq

    # ------------------------------------------------------------ parameter-sized results

    @cached_property
    @_full_precision
    def grad_sq_sum(self) -> dict[str, Tensor]:
        """{param name: sum_i g_i**2}; over every rank's samples with a process group."""
        local = self._unscaled(self._by_name(lambda u: u.sq_sums()), power=2)
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
            local_sq = self._unscaled(self._by_name(lambda u: u.sq_sums()), power=2)
            self.__dict__["grad_sum"], self.__dict__["grad_sq_sum"] = self._reduce(
                self.local_grad_sum, local_sq, count=True)
        return self.grad_sum, self.grad_sq_sum

    @_full_precision
    def dots(self, reference: dict[str, Tensor]) -> Tensor:
        """(B,) <g_i, R> for a reference gradient R given as {param name: tensor}."""
        total = units_.add_all([u.dots([reference[n] for n in u.names]) for u in self._units])
        if total is None:
            return self._zeros()
        return total if self._scale is None else total * self._scale

    def _sum_weights(self, w: Tensor | None, factor: float) -> Tensor:
        """(B,) factor * scale * w for the scaled representations (w = None: all ones)."""
        if self._scale is not None:
            factor = self._scale * factor
        if w is None:  # every weight `factor`
            return (factor.expand(self.batch_size) if isinstance(factor, Tensor)
                    else torch.full((self.batch_size,), factor, device=self._device, dtype=self.dtype))
        return w if isinstance(factor, float) and factor == 1.0 else w * factor

    @_full_precision
    def weighted_sum(self, w: Tensor | None, *, factor: float = 1.0) -> dict[str, Tensor]:
        """{param name: factor * sum_i w_i g_i} for weights w of shape (B,) (None: all ones).
        With a process group each rank passes its own samples' weights and gets the sum over
        every rank's samples (one all-reduce of P numbers)."""
        w = self._sum_weights(w, factor)
        local = self._by_name(lambda u: u.weighted(w))
        if self.process_group is None:
            return local
        return self._reduce(local, count=False)[0]

    @_full_precision
    def release_into(self, w: Tensor | None, write, *, factor: float = 1.0) -> None:
        """Hand factor * sum_i w_i g_i to `write({param name: tensor})` one unit at a time, the
        last layer first (as a plain backward forms the weight gradients), and free each unit's
        per-sample representation once it is written: the memory held then falls as p.grad
        grows, as in a plain backward, instead of every layer's inputs and output gradients
        staying until the end. Afterwards only the statistics read before are left (the rest
        raise). With a process group, the sum is all-reduced first, then everything is freed."""
        if self.process_group is not None:
            write(self.weighted_sum(w, factor=factor))
            self.release()
            return
        w = self._sum_weights(w, factor)
        units = self._units
        self.release()
        while units:  # popped: once the next one is taken, nothing holds this unit's factors
            unit = units.pop()
            write(dict(zip(unit.names, unit.weighted(w))))

    def release(self) -> None:
        """Drop the per-sample representations (and autograd's S); cached statistics stay."""
        self.dtype  # noqa: B018 - cached now: it reads the representations
        self._live_units, self._per_sample, self._given, self._gram, self._inputs = None, {}, {}, None, None

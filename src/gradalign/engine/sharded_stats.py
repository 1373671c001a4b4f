"""GradientStats over a model sharded with FSDP2: global statistics without a full gradient.

Each rank holds the factored per-sample gradients of its own samples for every layer (the
forward and backward of data parallel), so per-sample quantities (|g_i|, and <g_i, S> once S
is known) are local, as under DDP. What differs is every parameter-sized sum over samples:
it is reduced one FSDP unit at a time (engine/distributed/fsdp.py: the parameters of one
fully_shard call, the engine's units planned inside it), so a rank never holds more than one
unit's full-size sum, and what the statistics keep is sharded like the parameters:

    grad_sum, mean_grad, grad_sq_sum, weighted_sum(), mean_update()
        DTensors with each parameter's own spec: a reduce-scatter per unit of the rank's
        full-size sums (S_r; S_r and sum g**2 together for moment_sums), in FSDP's layout,
        so this rank receives its part of the global sum only.
    cosines, dots_with_mean, mean_grad_sq_norm (need <g_i, S> with the GLOBAL S)
        an all-reduce per unit of S_r: the unit's full S lives while its layers form d_i^T S a_i
        and its share of |S|^2, then only this rank's part of it is kept (as grad_sum).
    B over ranks: rides along with the first unit's collective, or one scalar all-reduce.

Parameters FSDP does not shard (ignored, or outside every unit) form one more unit reduced
by all-reduce, their statistics full tensors as under DDP. Communication per step, P the
trainable parameters: plain mean p.grad: one reduce-scatter of P (FSDP's own reduction);
GASW/GDSW: an all-reduce of P (S), two scalars (B, the normaliser), a reduce-scatter of P (the
weighted p.grad); GAGA: a reduce-scatter of 2P (S and sum g**2) and a scalar.
"""
from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from gradalign.engine import units as units_
from gradalign.engine.distributed import ddp
from gradalign.engine.distributed.fsdp import Sharding, Unit
from gradalign.engine.distributed.shards import full_value, reduce_scatter
from gradalign.engine.gradient_stats import GradientStats
from gradalign.engine.phases import TracedUnit
from gradalign.engine.representations import PerSampleGrad, in_full_precision


class ShardedGradientStats(GradientStats):
    """GradientStats of a sharded model (see the module's doc): the same statistics, the same
    values as one process on the concatenated batch; parameter-sized ones as DTensor shards.

    `names`: every trainable parameter, so that every rank reduces the same tensors in the
    same order (zeros where none of its samples reached a parameter)."""

    def __init__(self, per_sample: dict[str, PerSampleGrad], batch_size: int, *, sharding: Sharding,
                 param_shapes: dict[str, tuple[torch.Size, torch.dtype]], device=None, scale=None, trace=None):
        self._sharding = sharding
        self._trainable = param_shapes
        self._spans: list[tuple[Unit, list[str], int, int]] = []
        super().__init__(per_sample, batch_size, device=device, process_group=sharding.group,
                         param_shapes=param_shapes, scale=scale, trace=trace)
        units = self._plan(per_sample)  # planned again, inside each FSDP unit
        self._live_units = units if trace is None else [TracedUnit(u, trace) for u in units]

    def _plan(self, per_sample: dict[str, PerSampleGrad]) -> list:
        """The engine's units inside each FSDP unit, in the model's order (one DenseBlock per unit)."""
        planned: list = []
        for unit in self._sharding.units:
            names = [n for n in unit.names if n in self._trainable]
            if names:
                units = units_.plan({n: per_sample[n] for n in names if n in per_sample})
                self._spans.append((unit, names, len(planned), len(planned) + len(units)))
                planned.extend(units)
        return planned

    def _groups(self) -> list[tuple[Unit, list[str], list]]:
        """[(FSDP unit, its trainable names, the engine's units serving them here)]."""
        live = self._units
        return [(unit, names, live[a:b]) for unit, names, a, b in self._spans]

    # ------------------------------------------------------------ collectives per unit

    def _full(self, names: list[str], found: dict[str, Tensor]) -> list[Tensor]:
        """`found` in the order of `names`, zeros of the parameter's full shape where absent."""
        return [found[n] if n in found else torch.zeros(self._trainable[n][0], dtype=self.dtype, device=self._device)
                for n in names]

    def _count(self) -> int | None:
        """B to ride along with the next collective, if the global B is not known yet."""
        return self.batch_size if self._global_batch is None else None

    def _reduce_scatter(self, unit: Unit, names: list[str], *parts: list[Tensor]) -> list[dict[str, Tensor]]:
        """Each list of full-size local sums (one tensor per name) summed over ranks; this rank's
        parts as DTensors (a sharded unit, one reduce-scatter for all lists) or full tensors
        (the unsharded unit, one all-reduce)."""
        count = self._count()
        if unit.specs is None:
            reduced, total = ddp.all_reduce_dicts([dict(zip(names, p)) for p in parts], count,
                                                  self.process_group, self._device)
        else:
            specs = [unit.specs[n] for n in names]
            flat, total = reduce_scatter([t for p in parts for t in p], specs * len(parts), self.process_group, count)
            reduced = [{n: spec.dtensor(t) for n, spec, t in zip(names, specs, flat[k * len(names):])}
                       for k in range(len(parts))]
        if count is not None:
            self._global_batch = total
        return reduced

    def _all_reduce(self, names: list[str], local: list[Tensor]) -> list[Tensor]:
        """The full-size global sums of one unit (one all-reduce)."""
        count = self._count()
        (reduced,), total = ddp.all_reduce_dicts([dict(zip(names, local))], count, self.process_group, self._device)
        if count is not None:
            self._global_batch = total
        return list(reduced.values())

    def _local(self, units: list, per_unit) -> dict[str, Tensor]:
        out = {}
        for u in units:
            out.update(zip(u.names, per_unit(u)))
        return out

    # ------------------------------------------------------------ the sums over samples

    @property
    def global_batch_size(self) -> int:
        if self._global_batch is None:
            self._global_batch = int(round(float(self.sum_over_ranks(
                torch.tensor(float(self.batch_size), device=self._device)))))
        return self._global_batch

    @cached_property
    @in_full_precision
    def grad_sum(self) -> dict[str, Tensor]:
        """{name: S}, S over every rank's samples, as DTensor shards (one reduce-scatter per unit)."""
        out = {}
        for unit, names, units in self._groups():
            local = self._unscaled(self._local(units, lambda u: u.weighted(None)))  # fresh tensors: S_r
            out.update(self._reduce_scatter(unit, names, self._full(names, local))[0])
        return out

    @cached_property
    @in_full_precision
    def mean_grad(self) -> dict[str, Tensor]:
        B = self.global_batch_size
        return {n: s / B for n, s in self.grad_sum.items()}

    def mean_update(self) -> dict[str, Tensor]:
        B = self.global_batch_size
        return {n: s / B for n, s in self.grad_sum.items()}

    @cached_property
    @in_full_precision
    def _cosine_terms(self) -> tuple[Tensor, Tensor]:
        """((B,) <g_i, S>, () |S|^2) / scale^2 with the global S, formed one unit at a time from
        that unit's all-reduced S; this rank's part of each S is kept as grad_sum."""
        dots, squares, parts = [], [], {}
        inv = None if self._scale is None else 1.0 / self._scale
        for unit, names, units in self._groups():
            local = self._unscaled(self._local(units, lambda u: u.weighted(None)))
            S = self._all_reduce(names, self._full(names, local))
            del local
            if "grad_sum" not in self.__dict__:
                parts.update((n, s.clone() if unit.specs is None else unit.specs[n].dtensor(unit.specs[n].part(s)))
                             for n, s in zip(names, S))
            scaled = S if inv is None else torch._foreach_mul(S, inv)
            del S
            refs = dict(zip(names, scaled))
            dots.extend(u.cosine_terms([refs[n] for n in u.names])[0] for u in units)
            squares.append(units_.sum_of_squares(scaled))  # every parameter's |S|^2, used here or not
            del scaled, refs
        if "grad_sum" not in self.__dict__:
            self.__dict__["grad_sum"] = parts
        total, dot = units_.add_all(squares), units_.add_all(dots)
        return (self._zeros() if dot is None else dot,
                torch.zeros((), device=self._device, dtype=self.dtype) if total is None else total)

    @cached_property
    @in_full_precision
    def grad_sq_sum(self) -> dict[str, Tensor]:
        if "grad_sum" not in self.__dict__:
            return self.moment_sums()[1]
        out = {}
        for unit, names, units in self._groups():
            local = self._unscaled(self._local(units, lambda u: u.sq_sums()), power=2)
            out.update(self._reduce_scatter(unit, names, self._full(names, local))[0])
        return out

    @in_full_precision
    def moment_sums(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(grad_sum, grad_sq_sum) as shards, reduced together: one reduce-scatter of 2 x the unit per unit."""
        if "grad_sum" not in self.__dict__ and "grad_sq_sum" not in self.__dict__:
            sums, squares = {}, {}
            for unit, names, units in self._groups():
                s = self._unscaled(self._local(units, lambda u: u.weighted(None)))
                sq = self._unscaled(self._local(units, lambda u: u.sq_sums()), power=2)
                a, b = self._reduce_scatter(unit, names, self._full(names, s), self._full(names, sq))
                sums.update(a)
                squares.update(b)
            self.__dict__["grad_sum"], self.__dict__["grad_sq_sum"] = sums, squares
        return self.grad_sum, self.grad_sq_sum

    @in_full_precision
    def dots(self, reference: dict[str, Tensor]) -> Tensor:
        """(B,) <g_i, R>; R's shards (DTensors) are gathered one unit at a time."""
        total = []
        for _, _, units in self._groups():
            for u in units:
                total.append(u.dots([full_value(reference[n]) for n in u.names]))
        total = units_.add_all(total)
        if total is None:
            return self._zeros()
        return total if self._scale is None else total * self._scale

    @in_full_precision
    def weighted_sum(self, w: Tensor | None, *, factor: float = 1.0) -> dict[str, Tensor]:
        """{name: factor * sum_i w_i g_i} over every rank's samples, as shards (a reduce-scatter per unit)."""
        w = self._sum_weights(w, factor)
        out = {}
        for unit, names, units in self._groups():
            local = self._local(units, lambda u: u.weighted(w))
            out.update(self._reduce_scatter(unit, names, self._full(names, local))[0])
        return out

    @in_full_precision
    def release_into(self, w: Tensor | None, write, *, factor: float = 1.0) -> None:
        """`write` each unit's shards of factor * sum_i w_i g_i, the last unit first, freeing that
        unit's per-sample representations once its local sum is formed: one unit's full-size sum
        at a time, as FSDP's own post-backward."""
        w = self._sum_weights(w, factor)
        groups = self._groups()
        self.release()
        while groups:
            unit, names, units = groups.pop()
            local = {}
            while units:  # popped: each unit's factors are freed once its sum is formed
                u = units.pop()
                local.update(zip(u.names, u.weighted(w)))
            full = self._full(names, local)
            del local
            write(self._reduce_scatter(unit, names, full)[0])
            del full

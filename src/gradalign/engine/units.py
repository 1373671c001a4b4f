"""The per-parameter representations of one backward, grouped so that each statistic costs few
operator calls: `plan(per_sample)` returns units, each serving one or more parameters.

    Layer       a Factored weight, with the bias of the same map when both are trainable (the
                bias a column of ones in A: one product serves both). Its <g_i, S> and |S|^2
                come from the (B, B) Gram matrix, from S and the factors, or from S and the
                per-sample gradients formed a chunk at a time, whichever is cheapest for what
                is asked (`representations.cosine_route`); the Gram matrices of every Layer on that
                route are summed into ONE (B, B) matrix, whose diagonal then also gives those
                layers' |g_i|^2, and a layer on the last route keeps its |g_i|^2 from that pass.
    DenseBlock  every small Dense parameter (normalisation affines, unpaired biases) of one
                dtype, concatenated once into (B, P): each statistic is then one product or
                reduction for all of them, not one per parameter.
    Single      anything else (embeddings, row blocks, large dense gradients, other
                representations), through the per-parameter interface of engine/representations.

Every unit answers, for its parameters in the order of `names`:
    sq_norms() (B,); sums() [S]; dots(refs) (B,) <g_i, R>; cosine_terms(refs) ((B,) <g_i, S>,
    [tensors whose squared norms add up to |S|^2] or a 0-d |S|^2; refs: S where it exists, else
    None); weighted(w) [sum_i w_i g_i]; sq_sums() [sum_i g_i**2].
`sums()` is cached, so S is formed at most once per unit (for the factor route, the mean
gradient and p.grad alike).
"""
from __future__ import annotations

import math
from functools import cached_property

import torch
from torch import Tensor

from gradalign.engine.representations import Dense, Factored, FactoredBias, PerSampleGrad
from gradalign.engine.representations.dense import row_sq_norms

# Dense parameters with at most this many numbers per sample are concatenated into one block.
_BLOCK_MAX = 1 << 13


class Layer:
    """A Factored weight and, when `bias`, the bias of the same map (names: weight, bias)."""

    def __init__(self, names: tuple[str, ...], rep: Factored):
        self.names, self.rep, self.bias = names, rep, len(names) == 2
        self._sq: Tensor | None = None  # |g_i|^2 where cosine_terms formed the gradients

    def sq_norms(self) -> Tensor:
        return self.rep.sq_norms(self.bias) if self._sq is None else self._sq

    def gram_is_cheaper(self, have_sum: bool) -> bool:
        return self.rep.cosine_route(have_sum) == "gram"

    def add_gram(self, K: Tensor | None) -> Tensor:
        return self.rep.add_gram(K, self.bias)

    @cached_property
    def _sums(self) -> list[Tensor]:
        weight, bias = self.rep.weighted_sums(None, self.bias)
        return [weight, bias] if self.bias else [weight]

    def sums(self) -> list[Tensor]:
        return self._sums

    def dots(self, refs: list[Tensor]) -> Tensor:
        return self.rep.dots(refs[0], refs[1] if self.bias else None)

    def cosine_terms(self, refs: list[Tensor] | None) -> tuple[Tensor, list[Tensor]]:
        S = self.sums() if refs is None else refs
        if self.rep.cosine_route(refs is not None) == "materialise":  # and |g_i|^2 from the same pass
            self._sq, dots = self.rep.cosine_terms(self.bias, S)
            return dots, S
        return self.dots(S), S

    def weighted(self, w: Tensor | None) -> list[Tensor]:
        weight, bias = self.rep.weighted_sums(w, self.bias)
        return [weight, bias] if self.bias else [weight]

    def sq_sums(self) -> list[Tensor]:
        weight, bias = self.rep.sq_sums(self.bias)
        return [weight, bias] if self.bias else [weight]

    def route(self, statistic: str, *args) -> str:
        """How `statistic` is computed here (a label for traces, engine/phases.py)."""
        T = self.rep.A.shape[2]
        if statistic in ("add_gram", "cosine_terms"):
            have_sum = statistic == "cosine_terms" and bool(args and args[0] is not None)
            route = {"gram": "Gram", "factors": "d S a", "materialise": "formed chunks"}[self.rep.cosine_route(have_sum)]
        elif statistic == "dots":
            route = "d R a"
        elif statistic == "sq_norms":
            route = "2-D" if T == 1 else ("ghost" if self.rep.ghost_is_cheaper() else "formed chunks")
        else:
            route = "factors"
        return f"Factored T={T}{' + bias' if self.bias else ''}, {route}"


def _grads(rep: Dense | FactoredBias) -> Tensor:
    return rep.grads


class DenseBlock:
    """Small dense per-sample gradients of one dtype, side by side: X (B, P_total)."""

    def __init__(self, names: tuple[str, ...], reps: list):
        self.names, self.reps = names, reps
        self.shapes = [_grads(r).shape[1:] for r in reps]
        self.sizes = [math.prod(s) for s in self.shapes]

    @cached_property
    def X(self) -> Tensor:
        grads = [_grads(r) for r in self.reps]
        B = grads[0].shape[0]
        if len(grads) == 1:
            return grads[0].reshape(B, -1)
        return torch.cat([g.reshape(B, -1) for g in grads], 1)

    def _split(self, flat: Tensor) -> list[Tensor]:
        if len(self.sizes) == 1:
            return [flat.view(self.shapes[0])]
        return [part.view(shape) for part, shape in zip(flat.split(self.sizes), self.shapes)]

    def _flat(self, refs: list[Tensor]) -> Tensor:
        dtype = self.X.dtype
        flat = refs[0].reshape(-1) if len(refs) == 1 else torch.cat([r.reshape(-1) for r in refs])
        return flat if flat.dtype == dtype else flat.to(dtype)

    def sq_norms(self) -> Tensor:
        return row_sq_norms(self.X)

    def gram_is_cheaper(self, have_sum: bool) -> bool:
        return False

    @cached_property
    def _sum(self) -> Tensor:
        return self.X.sum(0)

    def sums(self) -> list[Tensor]:
        return self._split(self._sum)

    def dots(self, refs: list[Tensor]) -> Tensor:
        return self.X @ self._flat(refs)

    def cosine_terms(self, refs: list[Tensor] | None) -> tuple[Tensor, Tensor]:
        S = self._sum if refs is None else self._flat(refs)
        return self.X @ S, S.dot(S)

    def weighted(self, w: Tensor | None) -> list[Tensor]:
        if w is None:
            return self.sums()
        return self._split(w.to(self.X.dtype) @ self.X)

    def sq_sums(self) -> list[Tensor]:
        return self._split(self.X.square().sum(0))

    def route(self, statistic: str, *args) -> str:
        """A label for traces (engine/phases.py)."""
        return f"one block of {len(self.names)} small dense parameters"


class Single:
    """One parameter through the per-parameter interface of its representation."""

    def __init__(self, name: str, rep: PerSampleGrad):
        self.names, self.rep = (name,), rep

    def sq_norms(self) -> Tensor:
        return self.rep.sq_norms()

    def gram_is_cheaper(self, have_sum: bool) -> bool:
        return False

    @cached_property
    def _sums(self) -> list[Tensor]:
        return [self.rep.weighted_sum(None)]

    def sums(self) -> list[Tensor]:
        return self._sums

    def dots(self, refs: list[Tensor]) -> Tensor:
        return self.rep.dots(refs[0])

    def cosine_terms(self, refs: list[Tensor] | None) -> tuple[Tensor, Tensor | list[Tensor]]:
        if refs is not None:
            return self.rep.dots(refs[0]), refs
        total = lambda: self.sums()[0]  # noqa: E731 - formed only if the representation needs S
        return self.rep.dots_with_sum(total), self.rep.sum_sq_norm(total)

    def weighted(self, w: Tensor | None) -> list[Tensor]:
        return [self.rep.weighted_sum(w)]

    def sq_sums(self) -> list[Tensor]:
        return [self.rep.sq_sum()]

    def route(self, statistic: str, *args) -> str:
        """A label for traces (engine/phases.py)."""
        return type(self.rep).__name__


Unit = Layer | DenseBlock | Single


def _per_sample_size(rep) -> int:
    if isinstance(rep, FactoredBias):
        return rep.of.D.shape[1] * rep.of.D.shape[3]
    return math.prod(rep.grads.shape[1:])


def plan(per_sample: dict[str, PerSampleGrad]) -> list[Unit]:
    """The units serving every parameter of `per_sample`, each parameter exactly once."""
    owners = {id(rep): name for name, rep in per_sample.items() if isinstance(rep, Factored)}
    bias_of: dict[str, str] = {}  # weight name -> the name of its paired bias
    for name, rep in per_sample.items():
        if isinstance(rep, FactoredBias) and (weight := owners.get(id(rep.of))) and weight not in bias_of:
            bias_of[weight] = name
    paired = set(bias_of.values())
    units: list[Unit] = []
    blocks: dict[torch.dtype, list[tuple[str, PerSampleGrad]]] = {}
    for name, rep in per_sample.items():
        if name in paired:
            continue
        if isinstance(rep, Factored):
            units.append(Layer((name, bias_of[name]) if name in bias_of else (name,), rep))
        elif type(rep) in (Dense, FactoredBias) and _per_sample_size(rep) <= _BLOCK_MAX:
            blocks.setdefault(rep.dtype, []).append((name, rep))
        else:
            units.append(Single(name, rep))
    for members in blocks.values():
        units.append(DenseBlock(tuple(n for n, _ in members), [r for _, r in members]))
    return units


def add_all(terms: list[Tensor]) -> Tensor | None:
    """The sum of same-shaped tensors in at most two operator calls (None for no terms)."""
    if not terms:
        return None
    if len(terms) == 1:
        return terms[0]
    if len(terms) == 2:
        return terms[0] + terms[1]
    return torch.stack(terms).sum(0)


def sum_of_squares(tensors: list[Tensor]) -> Tensor | None:
    """sum_k |t_k|^2 over tensors of any shapes, in three operator calls."""
    if not tensors:
        return None
    if len(tensors) == 1:
        flat = tensors[0].reshape(-1)
        return flat.dot(flat)
    norms = torch.stack(torch._foreach_norm(tensors))
    return torch.linalg.vecdot(norms, norms)

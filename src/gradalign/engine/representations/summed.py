"""Per-sample gradients of ONE parameter that several modules use (tied weights).

A parameter used in several places has per-sample gradients g_i = sum_k g_i^(k), one
contribution per use. Contributions of the same kind combine into one representation
(`merge`: two Factored uses concatenate along positions, two IndexedRows along tokens, as
for one module called twice). Contributions of different kinds (an Embedding's rows and a
Linear's factors sharing one matrix, as in a language model's tied input and output
embeddings) stay apart in `Summed`, and every statistic adds the pairwise cross terms:

    |g_i|^2        = sum_k |g_i^(k)|^2 + 2 sum_{k<l} <g_i^(k), g_i^(l)>
    sum_i g_i**2   = sum_k sum_i (g_i^(k))**2 + 2 sum_{k<l} sum_i g_i^(k) * g_i^(l)
    <g_i, R>, sum_i w_i g_i: sums over the contributions.

The cross terms come from the factors where a route exists, without forming per-sample
gradients of the whole parameter. For an Embedding's g_i^E = sum_t onehot(idx_t) e_t^T and
a Linear's g_i^L = sum_s d_s a_s^T on the same (V, D) matrix, the Linear's gradient on the
rows the sample looks up is L_i[idx_t] = sum_s d_s[idx_t] a_s, so

    <g_i^E, g_i^L> = sum_{t,s} d_s[idx_t] (a_s . e_t)                    (B T S (D + 1))
    sum_i g_i^E * g_i^L = sum_{i,t} onehot(idx_t) (e_t * L_i[idx_t])      (the same cost)

A dense contribution pairs with the others through their factors (d_t^T X_i a_t, or
X_i[idx_t] . e_t); pairs without such a route (row blocks, factors of different layouts)
are materialised, per sample, for that pair only.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

from gradalign.engine.representations.dense import Dense, IndexedRows, RowBlocks, sq_norm
from gradalign.engine.representations.factored import Factored, PerSampleGrad


def combine(a, b):
    """The per-sample gradients of a parameter with contributions a and b: g_i = a_i + b_i."""
    if isinstance(a, Summed):
        return a.add(b)
    if isinstance(b, Summed):
        return b.add(a)
    return a.merge(b) if _same_kind(a, b) else Summed([a, b])


def _same_kind(a, b) -> bool:
    """Whether a.merge(b) keeps the representation (no materialising)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, Factored):  # the same (groups, n_in, n_out) layout
        return a.A.shape[1] == b.A.shape[1] and a.A.shape[3] == b.A.shape[3] and a.D.shape[3] == b.D.shape[3]
    if isinstance(a, IndexedRows):
        return a.num_rows == b.num_rows
    if isinstance(a, RowBlocks):
        return a.sizes == b.sizes
    return isinstance(a, Dense)


class Summed:
    """g_i = sum_k parts[k]_i, parts of different kinds (at most one per kind that merges)."""

    def __init__(self, parts: list):
        self.parts = list(parts)

    def add(self, other) -> "Summed":
        others = other.parts if isinstance(other, Summed) else [other]
        parts = list(self.parts)
        for x in others:
            k = next((k for k, p in enumerate(parts) if _same_kind(p, x)), None)
            if k is None:
                parts.append(x)
            else:
                parts[k] = parts[k].merge(x)
        return Summed(parts)

    merge = add

    @property
    def dtype(self) -> torch.dtype:
        return functools.reduce(torch.promote_types, (p.dtype for p in self.parts))

    def _pairs(self):
        return ((a, b) for k, a in enumerate(self.parts) for b in self.parts[k + 1:])

    def sq_norms(self) -> Tensor:
        total = sum(p.sq_norms() for p in self.parts)
        for a, b in self._pairs():
            total = total + 2 * cross_dots(a, b)
        return total

    def dots(self, R: Tensor) -> Tensor:
        return sum(p.dots(R) for p in self.parts)

    def dots_with_sum(self, total: Callable[[], Tensor]) -> Tensor:
        S = total()  # the whole parameter's sum: each part's own Gram route would pair it with its own sum only
        return sum(p.dots(S) for p in self.parts)

    def sum_sq_norm(self, total: Callable[[], Tensor]) -> Tensor:
        return sq_norm(total())

    def weighted_sum(self, w: Tensor | None) -> Tensor:
        return sum(p.weighted_sum(w) for p in self.parts)

    def sq_sum(self) -> Tensor:
        total = sum(p.sq_sum() for p in self.parts)
        for a, b in self._pairs():
            total = total + 2 * cross_sq_sum(a, b)
        return total

    def dense(self) -> Dense:
        return Dense(sum(materialise(p) for p in self.parts))


# -- materialised per-sample gradients, for pairs without a route --------------------------

def materialise(x) -> Tensor:
    """(B, *shape) per-sample gradients of any representation."""
    if isinstance(x, IndexedRows):
        B, T = x.index.shape
        out = x.D.new_zeros(B * x.num_rows, x.D.shape[-1])
        rows = (torch.arange(B, device=x.index.device).unsqueeze(1) * x.num_rows + x.index).reshape(-1)
        out.index_add_(0, rows, x.D.reshape(B * T, -1))
        return out.reshape(B, x.num_rows, -1)
    return x.dense().grads


# -- cross terms: (B,) <a_i, b_i> and sum_i a_i * b_i -------------------------------------

def _rows_of_factored(e: IndexedRows, f: Factored) -> Tensor | None:
    """L_i[idx_it] = sum_s d_is[idx_it] a_is, (B, T, dim): the factored gradient's rows that
    the embedding's tokens look up; None where the layouts do not line up."""
    if f.A.shape[1] != 1 or f.D.shape[3] != e.num_rows or f.A.shape[3] != e.D.shape[-1]:
        return None
    a, d = f.A[:, 0], f.D[:, 0]  # (B, S, dim), (B, S, num_rows)
    picked = d.gather(2, e.index.unsqueeze(1).expand(-1, d.shape[1], -1))  # (B, S, T): d_is[idx_it]
    return torch.einsum("bst,bsi->bti", picked, a.to(picked.dtype))


def _rows_of_dense(e: IndexedRows, x: Dense) -> Tensor:
    grads = x.grads.reshape(x.grads.shape[0], e.num_rows, -1)  # (B, num_rows, dim)
    return grads.gather(1, e.index.unsqueeze(2).expand(-1, -1, grads.shape[2]))


def _rows(e: IndexedRows, other) -> Tensor | None:
    if isinstance(other, Factored):
        return _rows_of_factored(e, other)
    if isinstance(other, Dense):
        return _rows_of_dense(e, other)
    return None


def _factored_dot_dense(f: Factored, x: Dense) -> Tensor:
    """<d a^T summed over positions, X_i> = sum_t d_it^T X_i a_it, per sample."""
    B, G, _, n_in = f.A.shape
    X = x.grads.reshape(B, G, f.D.shape[3], n_in).to(f.A.dtype)
    return torch.einsum("bgto,bgoi,bgti->b", f.D, X, f.A)


def _ordered(a, b):
    """(a, b) with an IndexedRows first, else a Factored first."""
    if isinstance(b, IndexedRows) or (isinstance(b, Factored) and not isinstance(a, IndexedRows)):
        return b, a
    return a, b


def cross_dots(a, b) -> Tensor:
    a, b = _ordered(a, b)
    if isinstance(a, IndexedRows):
        rows = _rows(a, b)
        if rows is not None:
            return (a.D * rows).sum(dim=(1, 2))
    elif isinstance(a, Factored) and isinstance(b, Dense):
        return _factored_dot_dense(a, b)
    A, B_ = materialise(a), materialise(b)
    return torch.linalg.vecdot(A.reshape(A.shape[0], -1), B_.reshape(B_.shape[0], -1).to(A.dtype))


def cross_sq_sum(a, b) -> Tensor:
    a, b = _ordered(a, b)
    if isinstance(a, IndexedRows):
        rows = _rows(a, b)
        if rows is not None:
            out = a.D.new_zeros(a.num_rows, a.D.shape[-1])
            out.index_add_(0, a.index.reshape(-1), (a.D * rows).reshape(-1, a.D.shape[-1]))
            return out
    A, B_ = materialise(a), materialise(b)
    return (A * B_.to(A.dtype)).sum(0)


PerSampleGradOrSum = PerSampleGrad | Summed

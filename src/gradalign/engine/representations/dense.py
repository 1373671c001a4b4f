"""Per-sample gradients kept whole (Dense), as rows of a table (IndexedRows), or as row blocks
(RowBlocks); `FromSum`, the <g_i, S> and |S|^2 of any representation without a cheaper route
(the protocol is in this package's __init__, the factored representations in factored.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from gradalign.engine.representations.precision import upcast


def sq_norm(t: Tensor) -> Tensor:
    """|t|^2 as one dot product (no squared copy of t)."""
    flat = t.reshape(-1)
    return flat.dot(flat)


def row_sq_norms(t: Tensor) -> Tensor:
    """(rows,) |t_i|^2 over the last dim, in one read of t (vecdot(t, t) writes a product first)."""
    return torch.linalg.vector_norm(t, dim=-1).square_()


class FromSum:
    """<g_i, S> and |S|^2 from S itself, for representations with no cheaper route."""

    def dots_with_sum(self, total: Callable[[], Tensor]) -> Tensor:
        return self.dots(total())

    def sum_sq_norm(self, total: Callable[[], Tensor]) -> Tensor:
        return sq_norm(total())


@dataclass
class IndexedRows(FromSum):
    """g_i = sum_t onehot(index[i, t]) D[i, t]^T for a (num_rows, dim) table (nn.Embedding).

    index: (B, T) long, D: (B, T, dim) output gradients.
    """

    index: Tensor
    D: Tensor
    num_rows: int

    @property
    def dtype(self) -> torch.dtype:
        return self.D.dtype

    def __post_init__(self):
        self.D = upcast(self.D)

    def _per_sample_rows(self) -> tuple[Tensor, Tensor, Tensor]:
        """Every distinct (sample, row) pair's sample, row and summed gradient, in B T slots (unused
        slots: sample 0, row 0, zero gradient): (B T,), (B T,), (B T, dim). Sorting the pairs
        instead of torch.unique keeps every shape fixed, so nothing waits for the device."""
        B, T = self.index.shape
        key = torch.arange(B, device=self.index.device).unsqueeze(1) * self.num_rows + self.index
        key, order = key.reshape(-1).sort()
        first = torch.ones_like(key, dtype=torch.bool)
        first[1:] = key[1:] != key[:-1]
        slot = first.cumsum(0) - 1  # (B T,) the slot of each entry's (sample, row) pair
        grads = self.D.new_zeros(B * T, self.D.shape[-1])
        grads.index_add_(0, slot, self.D.reshape(B * T, -1)[order])
        rows = torch.zeros_like(key).scatter_(0, slot, key % self.num_rows)
        samples = torch.zeros_like(key).scatter_(0, slot, key // self.num_rows)
        return samples, rows, grads

    def sq_norms(self) -> Tensor:
        B, T = self.index.shape
        if T > 4 * self.D.shape[-1]:  # many lookups of short rows (T5's (T, T) relative-position buckets):
            samples, _, grads = self._per_sample_rows()  # sum each (sample, row) first, B T dim not B T^2
            return grads.new_zeros(B).index_add_(0, samples, row_sq_norms(grads))
        # |g_i|^2 = sum_{t,s} [index_it == index_is] d_it . d_is
        same = (self.index.unsqueeze(2) == self.index.unsqueeze(1)).to(self.D.dtype)
        return (same * (self.D @ self.D.transpose(1, 2))).sum(dim=(1, 2))

    def dots(self, R: Tensor) -> Tensor:
        return (R.to(self.D.dtype)[self.index] * self.D).sum(dim=(1, 2))

    def weighted_sum(self, w: Tensor | None) -> Tensor:
        D = self.D if w is None else self.D * w.view(-1, 1, 1)
        out = self.D.new_zeros(self.num_rows, self.D.shape[-1])
        out.index_add_(0, self.index.reshape(-1), D.reshape(-1, self.D.shape[-1]))
        return out

    def sq_sum(self) -> Tensor:
        _, rows, grads = self._per_sample_rows()
        out = self.D.new_zeros(self.num_rows, self.D.shape[-1])
        out.index_add_(0, rows, grads.square())
        return out

    def merge(self, other: "IndexedRows") -> "IndexedRows":
        return IndexedRows(torch.cat([self.index, other.index], 1), torch.cat([self.D, other.D], 1), self.num_rows)


@dataclass
class Dense(FromSum):
    """The per-sample gradients themselves, grads: (B, *shape). For small parameters only
    (biases, normalisation affines) or the torch.func fallback."""

    grads: Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.grads.dtype

    def __post_init__(self):
        self.grads = upcast(self.grads)

    def _flat(self) -> Tensor:  # (B, P); reshape, as a scalar parameter's grads are (B,)
        return self.grads.reshape(self.grads.shape[0], -1)

    def sq_norms(self) -> Tensor:
        return row_sq_norms(self._flat())

    def dots(self, R: Tensor) -> Tensor:
        return self._flat() @ R.reshape(-1).to(self.grads.dtype)

    def weighted_sum(self, w: Tensor | None) -> Tensor:
        return self.grads.sum(0) if w is None else torch.tensordot(w.to(self.grads.dtype), self.grads, dims=1)

    def sq_sum(self) -> Tensor:
        return self.grads.square().sum(0)

    def merge(self, other: "PerSampleGrad") -> "Dense":
        return Dense(self.grads + (other.grads if isinstance(other, Dense) else other.dense().grads))

    def dense(self) -> "Dense":
        return self


@dataclass
class RowBlocks:
    """g_i = cat_k g_i^(k) along dim 0: a parameter whose row blocks are served separately
    (nn.MultiheadAttention's packed in_proj_weight when query and key/value differ).

    blocks: per-sample gradients of each row block, of `sizes[k]` rows each; shape: the whole.
    """

    blocks: list
    sizes: list[int]
    shape: torch.Size

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0].dtype

    def _split(self, R: Tensor) -> tuple[Tensor, ...]:
        return R.reshape(self.shape).split(self.sizes)

    def sq_norms(self) -> Tensor:
        return sum(b.sq_norms() for b in self.blocks)

    def dots(self, R: Tensor) -> Tensor:
        return sum(b.dots(r) for b, r in zip(self.blocks, self._split(R)))

    def _parts(self, total: Callable[[], Tensor]) -> list[Callable[[], Tensor]]:
        split = {}  # S is split once, and only if some block asks for it

        def part(k: int) -> Tensor:
            if not split:
                split.update(enumerate(self._split(total())))
            return split[k]
        return [lambda k=k: part(k) for k in range(len(self.blocks))]

    def dots_with_sum(self, total: Callable[[], Tensor]) -> Tensor:
        return sum(b.dots_with_sum(t) for b, t in zip(self.blocks, self._parts(total)))

    def sum_sq_norm(self, total: Callable[[], Tensor]) -> Tensor:
        return sum(b.sum_sq_norm(t) for b, t in zip(self.blocks, self._parts(total)))

    def weighted_sum(self, w: Tensor | None) -> Tensor:
        return torch.cat([b.weighted_sum(w).reshape(n, -1) for b, n in zip(self.blocks, self.sizes)]).reshape(self.shape)

    def sq_sum(self) -> Tensor:
        return torch.cat([b.sq_sum().reshape(n, -1) for b, n in zip(self.blocks, self.sizes)]).reshape(self.shape)

    def dense(self) -> Dense:
        grads = [b.dense().grads for b in self.blocks]
        return Dense(torch.cat([g.reshape(g.shape[0], n, -1) for g, n in zip(grads, self.sizes)], 1)
                     .reshape(-1, *self.shape))

    def merge(self, other: "PerSampleGrad") -> "PerSampleGrad":
        if isinstance(other, RowBlocks) and other.sizes == self.sizes:
            return RowBlocks([a.merge(b) for a, b in zip(self.blocks, other.blocks)], self.sizes, self.shape)
        return self.dense().merge(other)

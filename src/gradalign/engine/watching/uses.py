"""The points of use of watched tensors (engine/watching/watch.py): where a value shared by all samples
meets the batch, and how the gradient captured there becomes per-sample gradients.

A watched tensor is a root (a raw parameter's alias, or a value with its own map from
per-sample gradients to per-sample parameter gradients: a module output shared by all samples,
an embedding lookup without the batch) or derived from roots by operations without the batch
(pos[:, :T], W.t(), gamma.exp()). A use either gives per-sample gradients directly (a linear
map or an embedding lookup with the parameter as the weight: factored, no per-sample matrix),
or the per-sample gradient (B, *shape) at a watched tensor, which `Source.pull` carries back
to its roots (one batched vector-Jacobian product of the short chain from the roots).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.graph import GradientEdge

from gradalign.engine.representations import Dense, Factored, IndexedRows, PerSampleGrad

Pulled = list[tuple["Source", Tensor]]  # (root, per-sample gradients at it)


@dataclass(eq=False)
class Source:
    """What a watched tensor is: `plain`, its value as an ordinary tensor, and either a root
    (`alias`: the parameter itself, transposed or not; or `to_grads`: a map from per-sample
    gradients at plain to per-sample parameter gradients) or derived from `roots`."""

    watch: object
    plain: Tensor
    alias: str | None = None
    transposed: bool = False
    to_grads: Callable[[Tensor], dict] | None = None
    roots: tuple["Source", ...] = ()
    label: str = ""  # what it is, for messages: "parameter m.w", "the output of m.pos (Embedding)"

    @property
    def is_root(self) -> bool:
        return self.alias is not None or self.to_grads is not None

    @property
    def root_list(self) -> tuple["Source", ...]:
        return (self,) if self.is_root else self.roots

    def pull(self, g: Tensor) -> Pulled:
        """The per-sample gradients g, (B, *plain.shape) at this tensor, at each of its roots."""
        if self.is_root:
            return [(self, g)]
        targets = [r.plain for r in self.roots]
        try:
            grads = torch.autograd.grad(self.plain, targets, g, retain_graph=True, is_grads_batched=True,
                                        allow_unused=True)
        except RuntimeError:  # a backward formula vmap cannot batch: one vjp per sample
            rows = [torch.autograd.grad(self.plain, targets, gi, retain_graph=True, allow_unused=True) for gi in g]
            grads = [None if rows[0][j] is None else torch.stack([r[j] for r in rows]) for j in range(len(targets))]
        return [(r, gr) for r, gr in zip(self.roots, grads) if gr is not None]

    def back(self, g: Tensor) -> dict[str, PerSampleGrad]:
        """A root's per-sample parameter gradients from the per-sample gradients g at it."""
        if self.to_grads is not None:
            return self.to_grads(g)
        return {self.alias: Dense(g.transpose(1, 2) if self.transposed else g)}


def rows(t: Tensor, batch: int, batch_dim: int, merged: bool = False) -> Tensor:
    """A use's input or output gradient as (B, T, n)."""
    n = t.shape[-1]
    if not merged:
        return t.movedim(batch_dim, 0).reshape(batch, -1, n)
    if batch_dim == 0:  # rows sample-major: x.view(-1, n) of a (B, ..., n) tensor
        return t.reshape(batch, -1, n)
    return t.reshape(-1, batch, n).transpose(0, 1)


@dataclass(eq=False)
class AtUse:
    """An elementwise or expand point of use: the gradient at w_b (B on the batch dim)."""

    edge: GradientEdge
    source: Source
    shape: torch.Size  # of the watched tensor

    def per_sample(self, g: Tensor, batch: int, batch_dim: int) -> tuple[dict, Pulled]:
        return {}, self.source.pull(g.movedim(batch_dim, 0).reshape(batch, *self.shape))


@dataclass(eq=False)
class LinearUse:
    """A linear point of use: the input x and the gradient at the op's output (bias included)."""

    edge: GradientEdge
    x: Tensor
    merged: bool  # x is 2-D with the batch and the positions merged in its rows (x.view(-1, n))
    weight: Source | None
    right: bool  # the weight is matmul's right operand, (in, out); else F.linear's (out, in)
    bias: Source | None

    def per_sample(self, g: Tensor, batch: int, batch_dim: int) -> tuple[dict, Pulled]:
        A, D = rows(self.x, batch, batch_dim, self.merged), rows(g, batch, batch_dim, self.merged)  # (B, T, in/out)
        direct, pulled = {}, []
        w = self.weight
        if w is not None and w.alias is not None:  # g(W) = D^T A for F.linear, A^T D for x @ W
            shape = w.plain.shape if not w.transposed else w.plain.shape[::-1]
            swap = self.right != w.transposed
            direct[w.alias] = (Factored(D.unsqueeze(1), A.unsqueeze(1), torch.Size(shape)) if swap
                               else Factored(A.unsqueeze(1), D.unsqueeze(1), torch.Size(shape)))
        elif w is not None:  # a weight computed from parameters: materialised, then carried back
            pulled += w.pull(torch.einsum("bti,bto->bio", A, D) if self.right else torch.einsum("bto,bti->boi", D, A))
        if self.bias is not None:
            pulled += self.bias.pull(D.sum(1).reshape(batch, *self.bias.plain.shape))
        return direct, pulled


def _without_padding(index: Tensor, d: Tensor, padding_idx: int | None, num_rows: int) -> Tensor:
    if padding_idx is None:
        return d
    padding_idx = padding_idx + num_rows if padding_idx < 0 else padding_idx
    return d * (index != padding_idx).unsqueeze(-1).to(d.dtype)  # torch gives the padding row no gradient


def lookup_grads(alias: str, index: Tensor, g: Tensor, padding_idx: int | None, num_rows: int) -> dict:
    """An embedding lookup's per-sample gradients: index (B, ...) rows, g (B, ..., dim)."""
    B = index.shape[0]
    index = index.reshape(B, -1)
    d = g.reshape(B, index.shape[1], g.shape[-1])
    return {alias: IndexedRows(index, _without_padding(index, d, padding_idx, num_rows), num_rows)}


@dataclass(eq=False)
class EmbeddingUse:
    """F.embedding(index, W) with index carrying the batch: g_i(W) = sum_t onehot(idx_it) d_it^T."""

    edge: GradientEdge
    index: Tensor
    weight: Source
    padding_idx: int | None

    def per_sample(self, g: Tensor, batch: int, batch_dim: int) -> tuple[dict, Pulled]:
        index, g = self.index.movedim(batch_dim, 0), g.movedim(batch_dim, 0)
        return lookup_grads(self.weight.alias, index, g, self.padding_idx, self.weight.plain.shape[0]), []


@dataclass(eq=False)
class NormUse:
    """F.layer_norm(x, shape, w, b): g_i(w) = sum_t d_it * xhat_it, g_i(b) = sum_t d_it."""

    edge: GradientEdge
    x: Tensor
    normalized_shape: tuple[int, ...]
    eps: float
    weight: Source | None
    bias: Source | None

    def per_sample(self, g: Tensor, batch: int, batch_dim: int) -> tuple[dict, Pulled]:
        shape = self.normalized_shape
        x, d = self.x.movedim(batch_dim, 0), g.movedim(batch_dim, 0)
        x, d = x.reshape(batch, -1, *shape), d.reshape(batch, -1, *shape).to(torch.promote_types(g.dtype, torch.float32))
        pulled = []
        if self.weight is not None:
            xhat = F.layer_norm(x.to(d.dtype), shape, eps=self.eps)
            pulled += self.weight.pull((d * xhat).sum(1).reshape(batch, *self.weight.plain.shape))
        if self.bias is not None:
            pulled += self.bias.pull(d.sum(1).reshape(batch, *self.bias.plain.shape))
        return {}, pulled

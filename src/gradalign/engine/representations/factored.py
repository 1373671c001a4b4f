"""Per-sample gradients of one parameter as linear maps over positions (Factored: a layer's
inputs and output gradients; FactoredBias: the bias beside them). Which route each statistic
takes: routes.py. CHUNK_ELEMENTS is public so that tests and benchmarks can set it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from gradalign.engine.representations import routes
from gradalign.engine.representations.dense import Dense, FromSum, IndexedRows, RowBlocks, row_sq_norms, sq_norm
from gradalign.engine.representations.precision import upcast
from gradalign.engine.representations.routes import cosine_route, ghost_is_cheaper

# Materialise per-sample gradients in chunks of at most this many numbers.
CHUNK_ELEMENTS = 1 << 24


def _one(t: Tensor) -> Tensor:
    """A 0-d 1 of t's dtype and device: the bias's column of ones, added where a product is formed."""
    return torch.ones((), dtype=t.dtype, device=t.device)


@dataclass
class Factored:
    """g_i = sum_t D[i, g, t]^T A[i, g, t], one (n_out, n_in) block per group g.

    A: (B, G, T, n_in) layer inputs (unfolded for convolutions), D: (B, G, T, n_out)
    output gradients; G is the number of groups (grouped convolutions), T the number of
    positions sharing the weight. The parameter has shape `shape` with G * n_out * n_in numbers,
    laid out group-major as (G * n_out, n_in) (nn.Linear: G = T = 1 or T = tokens;
    nn.Conv: T = output positions, n_in = in_channels/groups * kernel size).
    The common case G = T = 1 runs on 2-D views a (B, n_in), d (B, n_out).

    A bias added to this map's output (`bias()`, g_i(b) = sum_t D_it) is a column of ones in
    A: the methods taking `bias=True` answer for the weight and that bias together, with one
    product where the two parameters apart would need two (|g_i|^2 = (|a_i|^2 + 1) |d_i|^2,
    K = (A A^T + 1) * (D D^T), d_i^T (S_W a_i + S_b)). `GradientStats` pairs them.
    """

    A: Tensor
    D: Tensor
    shape: torch.Size

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    def __post_init__(self):
        A, D = upcast(self.A), upcast(self.D)
        if A.dtype != D.dtype:
            dtype = torch.promote_types(A.dtype, D.dtype)
            A, D = A.to(dtype), D.to(dtype)
        self.A, self.D = A, D

    @classmethod
    def rows(cls, a: Tensor, d: Tensor, shape: torch.Size) -> "Factored":
        """From a (B, ..., n_in) and d (B, ..., n_out), positions in the middle dims (nn.Linear);
        (B, n_in), (B, n_out) stay 2-D views, (B, T, n) 3-D ones, with no copies or extra operator calls."""
        B = a.shape[0]
        if a.dim() != 2 and a.dim() != 3:
            a, d = a.reshape(B, -1, a.shape[-1]), d.reshape(B, -1, d.shape[-1])
        a, d = upcast(a), upcast(d)
        if a.dtype != d.dtype:
            dtype = torch.promote_types(a.dtype, d.dtype)
            a, d = a.to(dtype), d.to(dtype)
        if a.dim() == 3:  # (B, T, n): kept as they are for the one-group routes (`_tokens`)
            out = cls(a.unsqueeze(1), d.unsqueeze(1), shape)
            out.__dict__["_tokens"] = (a, d)
            return out
        out = cls(a.view(B, 1, 1, a.shape[1]), d.view(B, 1, 1, d.shape[1]), shape)
        out.__dict__["_flat"] = (a, d)
        return out

    def _shaped(self, t: Tensor) -> Tensor:
        return t if t.shape == self.shape else t.reshape(self.shape)

    @property
    def _B(self) -> int:
        return self.A.shape[0]

    @cached_property
    def _tokens(self) -> tuple[Tensor, Tensor]:
        """(A, D) of one group (G = 1) as (B, T, n_in), (B, T, n_out) views."""
        return self.A[:, 0], self.D[:, 0]

    @cached_property
    def _flat(self) -> tuple[Tensor, Tensor] | None:
        """(a, d) as (B, n_in), (B, n_out) when G = T = 1, else None."""
        if self.A.shape[1] == 1 and self.A.shape[2] == 1:
            return self.A[:, 0, 0], self.D[:, 0, 0]
        return None

    @cached_property
    def d_sq_norms(self) -> Tensor:
        """(B,) |d_i|^2 of a one-position map (G = T = 1), unless taken from the loss scale's check."""
        return row_sq_norms(self._flat[1])

    def reuse_row_sq_norms(self, known: dict[int, tuple[Tensor, Tensor]]) -> None:
        """Take d_sq_norms from `known` ({id: (tensor, its squared row norms)}, engine/scale.py's
        check, which formed them as d_sq_norms would) where d is one of those tensors (2-D maps: `rows`)."""
        flat = self.__dict__.get("_flat")
        if flat is not None and (seen := known.get(id(flat[1]))) is not None and seen[0] is flat[1]:
            self.__dict__["d_sq_norms"] = seen[1]

    @cached_property
    def position_sums(self) -> Tensor:
        """(B, G, n_out) sum_t D[i, g, t]: the per-sample gradients of a bias on this map, formed
        once (the norms' ghost route forms them while D is in cache; p.grad's bias reuses them)."""
        return self.D.sum(2)

    def bias(self) -> "FactoredBias":
        """The per-sample gradients of a bias added to this map's output (G * n_out numbers)."""
        return FactoredBias(self)

    def _as_matrix(self, R: Tensor) -> Tensor:  # (G, n_out, n_in)
        return R.reshape(self.A.shape[1], self.D.shape[3], self.A.shape[3])

    def ghost_is_cheaper(self) -> bool:
        return ghost_is_cheaper(self.A.shape[2], self.A.shape[3], self.D.shape[3])

    # ------------------------------------------------------------ routes

    def cosine_route(self, have_sum: bool) -> str:
        """'gram', 'factors' or 'materialise': the cheapest route to |g_i|^2, <g_i, S> and |S|^2."""
        B, G, T, n_in = self.A.shape
        return cosine_route(B, G, T, n_in, self.D.shape[3], have_sum)

    def uses_gram(self) -> bool:
        """Whether `dots_with_sum` and `sum_sq_norm` (the per-parameter interface) use the Gram matrix."""
        return self.cosine_route(have_sum=False) == "gram"

    @cached_property
    def gram(self) -> Tensor:
        """(B, B) K_ij = <g_i, g_j> = sum_g (a_i.a_j)(d_i.d_j), for T = 1."""
        return self.add_gram(None)

    def add_gram(self, K: Tensor | None, bias: bool = False) -> Tensor:
        """K + this parameter's (B, B) Gram matrix (with bias=True, of the weight and its bias:
        (a_i.a_j + 1)(d_i.d_j) for T = 1); K is updated in place (None: a new matrix). For T > 1
        from the per-sample gradients formed at once, (B, G n_out n_in)."""
        B, G, T, _ = self.A.shape
        if T > 1:
            g = self._formed(self.A, self.D).reshape(B, -1)
            K = g @ g.T if K is None else K.addmm_(g, g.T)
            if bias:
                b = self.position_sums.reshape(B, -1)
                K.addmm_(b, b.T)
            return K
        flat = self._flat
        if flat is not None:
            a, d = flat
            aa, dd = F.linear(a, a), F.linear(d, d)  # a a^T, d d^T (F.linear: no transpose call)
            if bias:
                aa += 1
            return aa.mul_(dd) if K is None else K.addcmul_(aa, dd)
        a, d = self.A[:, :, 0].transpose(0, 1), self.D[:, :, 0].transpose(0, 1)  # (G, B, n)
        aa = torch.baddbmm(_one(a), a, a.transpose(1, 2)) if bias else a @ a.transpose(1, 2)
        term = (aa.mul_(d @ d.transpose(1, 2))).sum(0)
        return term if K is None else K.add_(term)

    @staticmethod
    def _formed(A: Tensor, D: Tensor, out: Tensor | None = None) -> Tensor:
        """The per-sample gradients of factors A, D (b samples), (b, G n_out n_in), in `out` if given."""
        b, G, _, n_in = A.shape
        n_out = D.shape[3]
        if G == 1:
            shaped = None if out is None else out.view(b, n_out, n_in)
            return torch.bmm(D[:, 0].transpose(1, 2), A[:, 0], out=shaped).view(b, -1)
        g = torch.einsum("bgto,bgti->bgoi", D, A).reshape(b, -1)
        return g if out is None else out.copy_(g)

    def cosine_terms(self, bias: bool, S: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(|g_i|^2, <g_i, S>) for S = [S_W(, S_b)], from the per-sample gradients formed a
        cache-sized chunk of samples at a time (the 'materialise' route): one product per chunk,
        then its norms and its products with S while it is in cache; the bias (when `bias`)
        from its own (B, G n_out) gradients sum_t d_it."""
        B, G, T, n_in = self.A.shape
        n_out = self.D.shape[3]
        n = G * n_out * n_in
        R = S[0].reshape(-1)
        R = R if R.dtype == self.A.dtype else R.to(self.A.dtype)
        step = max(1, routes.CACHE_ELEMENTS // n)
        buffer = self.A.new_empty(min(step, B), n)
        norms, dots = self.A.new_empty(B), self.A.new_empty(B)
        for start in range(0, B, step):
            a, d = self.A[start:start + step], self.D[start:start + step]
            g = self._formed(a, d, out=buffer[:a.shape[0]])
            torch.linalg.vector_norm(g, dim=1, out=norms[start:start + step])
            torch.mv(g, R, out=dots[start:start + step])
        sq = norms.square_()
        if bias:
            b = self.position_sums.reshape(B, -1)
            Rb = S[1].reshape(-1).to(b.dtype)
            sq = sq.add_(row_sq_norms(b))
            dots = dots.add_(b @ Rb)
        return sq, dots

    def _materialised_chunks(self):
        """Yield (start, (b, G, n_out, n_in)) chunks of the per-sample gradients."""
        per_sample = self.A.shape[1] * self.A.shape[3] * self.D.shape[3]
        step = max(1, CHUNK_ELEMENTS // max(per_sample, 1))
        for start in range(0, self._B, step):
            a, d = self.A[start:start + step], self.D[start:start + step]
            yield start, torch.einsum("bgto,bgti->bgoi", d, a)

    # ------------------------------------------------------------ statistics

    def sq_norms(self, bias: bool = False) -> Tensor:
        """(B,) |g_i|^2 (with bias=True: of the weight and its bias together)."""
        A, D = self.A, self.D
        if "gram" in self.__dict__ and not bias:
            return self.gram.diagonal()
        flat = self._flat
        if flat is not None:  # |d a^T|^2 = |a|^2 |d|^2; with the bias (|a|^2 + 1) |d|^2
            aa, dd = row_sq_norms(flat[0]), self.d_sq_norms
            return torch.addcmul(dd, aa, dd) if bias else aa * dd
        B = self._B
        if A.shape[2] == 1:
            aa = row_sq_norms(A)
            return ((aa + 1 if bias else aa) * row_sq_norms(D)).sum(dim=(1, 2))
        if self.ghost_is_cheaper():  # <A A^T, D D^T> per sample and group
            if A.shape[1] == 1:  # one group: (B, T, T) products of (B, T, n) views, fewer operator calls
                a, d = self._tokens
                AA, DD = torch.bmm(a, a.transpose(1, 2)), torch.bmm(d, d.transpose(1, 2))
            else:
                AA, DD = A @ A.transpose(-1, -2), D @ D.transpose(-1, -2)  # (B, G, T, T)
            out = torch.linalg.vecdot(AA.view(B, -1), DD.view(B, -1))
        else:
            out = A.new_empty(B)
            for start, g in self._materialised_chunks():
                out[start:start + g.shape[0]] = row_sq_norms(g.reshape(g.shape[0], -1))
        if bias:  # + |sum_t d_t|^2 (on the ghost route formed while D is in cache; weighted_sums reuses them)
            out += row_sq_norms(self.position_sums.reshape(B, -1))
        return out

    def dots(self, R: Tensor, Rb: Tensor | None = None) -> Tensor:
        """(B,) <g_i, R> = sum_t d_it^T R a_it; with Rb (the bias's R), plus <g_i(b), Rb>."""
        dtype = self.A.dtype
        R = R if R.dtype == dtype else R.to(dtype)
        if Rb is not None and Rb.dtype != dtype:
            Rb = Rb.to(dtype)
        B, G, T, n_in = self.A.shape
        n_out = self.D.shape[3]
        flat = self._flat
        if flat is not None:  # <u_i, d_i>, u_i = R a_i (+ Rb)
            a, d = flat
            Rm = R if R.dim() == 2 else R.reshape(n_out, n_in)
            if Rb is None and n_in < n_out:  # the narrower intermediate: d R
                return torch.linalg.vecdot(d @ Rm, a)
            return torch.linalg.vecdot(F.linear(a, Rm, Rb), d)
        if G == 1:  # u_it = R a_it (+ Rb), then <u_it, d_it> summed over positions
            Rm = R.reshape(n_out, n_in)
            a = self.A.reshape(B * T, n_in)
            if Rb is None and n_in < n_out:  # the narrower intermediate: d R
                return torch.linalg.vecdot((self.D.reshape(B * T, n_out) @ Rm).view(B, -1), self.A.reshape(B, -1))
            u = torch.addmm(Rb.reshape(-1), a, Rm.T) if Rb is not None else a @ Rm.T
            return torch.linalg.vecdot(u.view(B, -1), self.D.reshape(B, -1))
        # <d a^T, R> = d^T R a, summed over positions and groups
        DR = torch.einsum("bgto,goi->bgti", self.D, self._as_matrix(R))
        out = (DR * self.A).sum(dim=(1, 2, 3))
        if Rb is not None:
            out = out + self.position_sums.reshape(B, -1) @ Rb.reshape(-1)
        return out

    def dots_with_sum(self, total: Callable[[], Tensor]) -> Tensor:
        """<g_i, S> = sum_j K_ij on the Gram route, else d_i^T S a_i."""
        return self.gram.sum(1) if self.uses_gram() else self.dots(total())

    def sum_sq_norm(self, total: Callable[[], Tensor]) -> Tensor:
        """|S|^2 = sum_ij K_ij on the Gram route, else from S itself."""
        return self.gram.sum() if self.uses_gram() else sq_norm(total())

    def weighted_sums(self, w: Tensor | None, bias: bool = False) -> tuple[Tensor, Tensor | None]:
        """(sum_i w_i g_i(W), sum_i w_i g_i(b) or None without bias); w = None: all ones."""
        B, G, T, n_in = self.A.shape
        n_out = self.D.shape[3]
        if G == 1 and T > 1:
            return self._weighted_positions(w, bias)
        if G == 1:
            a, d = self._flat
            if w is None:
                return self._shaped(d.T.mm(a)), (d.sum(0) if bias else None)
            w = w.to(a.dtype) if w.dtype != a.dtype else w
            if n_in < n_out:  # scale the narrower factor (less memory traffic than scaling d)
                aw = a * w[:, None]
                return self._shaped(d.T.mm(aw)), (w @ d if bias else None)
            dw = d * w[:, None]
            return self._shaped(dw.T.mm(a)), (dw.sum(0) if bias else None)
        D = self.D if w is None else self.D * w.to(self.D.dtype).view(-1, 1, 1, 1)
        return (torch.einsum("bgto,bgti->goi", D, self.A).reshape(self.shape),
                D.sum(dim=(0, 2)).reshape(-1) if bias else None)

    def _weighted_positions(self, w: Tensor | None, bias: bool) -> tuple[Tensor, Tensor | None]:
        """weighted_sums for G = 1, T > 1: one (n_out, n_in) product over all B*T rows. The rows are
        taken in the order the factors are stored in, (b, t) or (t, b) (attention's projections keep
        (T, B) layouts), so that neither factor is copied to reorder it; the weights scale the
        narrower factor, written in that order in the same pass."""
        B, _, T, n_in = self.A.shape
        n_out = self.D.shape[3]
        scale_a = n_in < n_out
        a, d = self._tokens  # (B, T, n) views
        kept, scaled = (d, a) if scale_a else (a, d)
        tb = not kept.is_contiguous() and kept.transpose(0, 1).is_contiguous()  # stored in (T, B) order
        if tb:
            kept, scaled = kept.transpose(0, 1), scaled.transpose(0, 1)
        rows = kept.reshape(B * T, kept.shape[2])  # (a view where the layout allows)
        if w is None:
            other = scaled.reshape(B * T, scaled.shape[2])
        else:
            w = w.to(scaled.dtype) if w.dtype != scaled.dtype else w
            other = torch.empty(scaled.shape, dtype=scaled.dtype, device=scaled.device)
            torch.mul(scaled, w.view((1, -1, 1) if tb else (-1, 1, 1)), out=other)
            other = other.view(B * T, scaled.shape[2])
        d, a = (rows, other) if scale_a else (other, rows)
        bias_sum = None
        if bias:
            bias_sum = (d.sum(0) if w is None or not scale_a
                        else w @ self.position_sums.view(B, n_out))
        return self._shaped(d.T.mm(a)), bias_sum

    def weighted_sum(self, w: Tensor | None) -> Tensor:
        return self.weighted_sums(w)[0]

    def sq_sums(self, bias: bool = False) -> tuple[Tensor, Tensor | None]:
        """(sum_i g_i(W)**2, sum_i g_i(b)**2 or None without bias), elementwise."""
        A, D = self.A, self.D
        bias_sq = None
        if A.shape[2] == 1:  # sum_i (d_i a_i^T)^2 = (d^2)^T (a^2)
            d2 = D[:, :, 0].square()
            weight = torch.einsum("bgo,bgi->goi", d2, A[:, :, 0].square()).reshape(self.shape)
            return weight, (d2.sum(0).reshape(-1) if bias else None)
        total = A.new_zeros(A.shape[1], D.shape[3], A.shape[3])
        for _, g in self._materialised_chunks():
            total += g.square().sum(0)
        if bias:
            bias_sq = self.position_sums.square().sum(0).reshape(-1)
        return total.reshape(self.shape), bias_sq

    def sq_sum(self) -> Tensor:
        return self.sq_sums()[0]

    def merge(self, other: "PerSampleGrad") -> "PerSampleGrad":
        if not isinstance(other, Factored):
            return self.dense().merge(other)
        return Factored(torch.cat([self.A, other.A], dim=2), torch.cat([self.D, other.D], dim=2), self.shape)

    def dense(self) -> "Dense":
        """The per-sample gradients themselves, (B, *shape)."""
        return Dense(torch.einsum("bgto,bgti->bgoi", self.D, self.A).reshape(self._B, *self.shape))


@dataclass(eq=False)
class FactoredBias(FromSum):
    """g_i(b) = sum_t D[i, g, t] (all groups, group-major): the bias added to the output of the
    Factored map `of` (nn.Linear's, a convolution's on its ghost route). On its own it is Dense
    (its gradients are formed on first use); next to `of` in one GradientStats, the pair is served
    by `of` alone with bias=True (the bias as a column of ones in A), and this is never formed."""

    of: Factored

    @property
    def dtype(self) -> torch.dtype:
        return self.of.dtype

    @cached_property
    def grads(self) -> Tensor:  # (B, G * n_out)
        if self.of._flat is not None:
            return self.of._flat[1]
        D = self.of.D
        return (D[:, :, 0] if D.shape[2] == 1 else self.of.position_sums).reshape(D.shape[0], -1)

    def dense(self) -> "Dense":
        return Dense(self.grads)

    def sq_norms(self) -> Tensor:
        return row_sq_norms(self.grads)

    def dots(self, R: Tensor) -> Tensor:
        return self.grads @ R.reshape(-1).to(self.grads.dtype)

    def weighted_sum(self, w: Tensor | None) -> Tensor:
        return self.grads.sum(0) if w is None else w.to(self.grads.dtype) @ self.grads

    def sq_sum(self) -> Tensor:
        return self.grads.square().sum(0)

    def merge(self, other: "PerSampleGrad") -> "PerSampleGrad":
        if isinstance(other, FactoredBias):
            return FactoredBias(self.of.merge(other.of))
        return self.dense().merge(other)


PerSampleGrad = Factored | FactoredBias | IndexedRows | Dense | RowBlocks

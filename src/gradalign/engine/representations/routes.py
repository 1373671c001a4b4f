"""The routes of a Factored layer's statistics, chosen by multiply-add counts: the ghost route or
the per-sample gradients formed for its norms (`ghost_is_cheaper`), and the Gram matrix, the factors
or cache-sized formed chunks for its cosine terms (`cosine_route`). The size constants are public so
that tests and benchmarks can set them.
"""
from __future__ import annotations


def ghost_is_cheaper(T: int, n_in: int, n_out: int) -> bool:
    """A weight shared over T positions: the ghost route costs ~T^2 (n_in + n_out) per sample,
    materialising the per-sample gradient ~T n_in n_out."""
    return T * (n_in + n_out) <= n_in * n_out


# Per-sample gradients formed for the cosine terms: a cache-sized chunk at a time (this many
# numbers), or a whole layer at once for its Gram matrix (at most this many numbers, and at most
# twice its factors); a pass over a cache-hot chunk costs about as much as PASS_COST multiply-adds
# per number (set from benchmarks/engine.py on a CPU: vit_linear's GASW step is ~5% faster with the
# chunked route than with the factors, which a cost of 4 would choose).
CACHE_ELEMENTS = 1 << 17
FORMED_ELEMENTS = 1 << 22
PASS_COST = 2


def cosine_route(B: int, G: int, T: int, n_in: int, n_out: int, have_sum: bool) -> str:
    """The cheapest route to a Factored layer's |g_i|^2, <g_i, S> and |S|^2. Multiply-adds per
    sample and group, n = n_in n_out, S costing T n unless given:
      'gram'         T = 1: the (B, B) Gram matrix from the factors, B (n_in + n_out); T > 1: the
                     per-sample gradients formed (T n) for their Gram matrix (B n), where they fit.
                     Needs no S.
      'factors'      S; norms from the ghost or chunked route, min(T^2 (n_in + n_out), T n); and
                     d S a^T, T n.
      'materialise'  S; the per-sample gradients formed a cache-sized chunk at a time (T n), each
                     chunk passed over twice, for its norms and its dots with S."""
    n = n_in * n_out
    S = 0 if have_sum else T * n
    if T == 1:
        return "gram" if B * (n_in + n_out) < S + n else "factors"
    costs = {"factors": S + T * n + min(T * T * (n_in + n_out), T * n),
             "materialise": S + T * n + 2 * PASS_COST * n}
    if B * G * n <= FORMED_ELEMENTS and n <= 2 * T * (n_in + n_out):
        costs["gram"] = T * n + B * n + PASS_COST * n
    return min(costs, key=costs.get)

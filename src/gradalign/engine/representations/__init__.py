"""Per-sample gradients of ONE parameter, kept in factored form.

Each layer rule returns, per parameter, one of four representations of the B per-sample
gradients g_i (i = 1..B). None of them stores a (B, P) matrix unless that is the cheapest
route for that layer. Every representation answers the same six questions:

    sq_norms()            (B,)   |g_i|^2
    dots(R)               (B,)   <g_i, R> for a fixed tensor R of the parameter's shape
    dots_with_sum(total)  (B,)   <g_i, S>, S = sum_j g_j
    sum_sq_norm(total)    ()     |S|^2
    weighted_sum(w)       shape  sum_i w_i g_i (w = None: all ones)
    sq_sum()              shape  sum_i g_i**2 (elementwise)

`total` is a callable returning S, so a route that does not need S never forms it. The
sum rather than the mean gbar = S / B: the 1/B is applied once to the (B,) results, not
to every parameter-sized tensor. `merge(other)` combines two calls of the same module
(shared weights in one forward): the per-sample gradient of a module applied twice is
the sum of both contributions. Contributions of different kinds (tied weights: an Embedding's
rows and a Linear's factors; a raw parameter used both as a linear map and elementwise) are
combined by summed.py, with exact cross terms.

Precision: the factors are captured as the forward made them (bfloat16 or float16 under
autocast or in a half model) and upcast to float32 when a representation is built, so every
product and sum runs in float32 (a squared norm of float16 numbers would overflow at 65504).
Statistics come out in float32 (float64 for a float64 model).

Modules: factored.py (Factored, FactoredBias), routes.py (which route a Factored statistic takes), dense.py (Dense, IndexedRows,
RowBlocks), summed.py (contributions of several uses of one parameter), precision.py.
"""
from gradalign.engine.representations.dense import Dense, FromSum, IndexedRows, RowBlocks, sq_norm
from gradalign.engine.representations.factored import Factored, FactoredBias, PerSampleGrad
from gradalign.engine.representations.precision import full_precision, in_full_precision, upcast
from gradalign.engine.representations.routes import cosine_route, ghost_is_cheaper
from gradalign.engine.representations.summed import Summed, combine

__all__ = ["Dense", "Factored", "FactoredBias", "FromSum", "IndexedRows", "PerSampleGrad", "RowBlocks", "Summed",
           "combine", "cosine_route", "full_precision", "ghost_is_cheaper", "in_full_precision", "sq_norm", "upcast"]

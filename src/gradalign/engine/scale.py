"""The loss scale of one backward: one power of two that every output gradient is divided by
before the per-sample representations are built (GradientStats undoes it once per result).

Every per-sample gradient is linear in the output gradients, so the representations then hold
g_i / scale, and the squares the statistics form (|a|^2 |d|^2, Gram products, |S|^2) stay far
from float32's overflow (|g_i| > 1.8e19) and underflow (|g_i| < 1e-19) although |g_i| itself
fits: losses scaled by 1e20 or 1e-30 give the same cosines. A power of two changes no rounding.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from gradalign.engine.representations import Factored, FactoredBias
from gradalign.engine.representations.dense import row_sq_norms

# Output gradients whose largest magnitude lies in [2^-SAFE, 2^SAFE] are left as they are on the CPU
# (their squares, summed over up to 2^40 numbers, stay far inside float32's range).
SAFE_EXPONENT = 32
# the exponent a zero extreme is given: below every float32 exponent (-148), so it never wins the max;
# where every extreme is zero the clamp below makes it 2^-126 (dividing zeros changes nothing)
_NO_EXPONENT = -1000


def clearly_safe(grads: list[Tensor], rows: dict[int, tuple[Tensor, Tensor]] | None = None) -> bool:
    """Whether the gradients' largest magnitude is surely within 2^-SAFE .. 2^SAFE, from one norm per
    gradient (a vectorised sum of squares, about 2.5x cheaper than aminmax on the CPU): every
    |x| <= |g| and some |x| >= |g| / sqrt(numel), with a factor 4 kept for the norms' rounding.
    False where it cannot tell (squares out of float32's range: inf, or tiny and flushed); the exact
    min/max pass then decides, so the result never differs from it.

    With `rows`, a float32 (B, n) gradient (a one-position layer's) is read row by row instead: its
    (B,) squared row norms, `row_sq_norms` as the norms form them, go into `rows` by id with it, for the
    norms to reuse (`Factored.reuse_row_sq_norms`) rather than read the gradient again."""
    by_rows, others = [], []
    for g in grads:
        (by_rows if rows is not None and g.dim() == 2 and g.dtype == torch.float32 else others).append(g)
    norms = []  # one host read per kind: free on the CPU, and fewer operator calls than reducing there
    if by_rows:
        squares = [row_sq_norms(g) for g in by_rows]
        rows.update((id(g), (g, s)) for g, s in zip(by_rows, squares))
        sums = torch.stack([s.sum() for s in squares]).tolist()
        norms += [math.sqrt(v) if v >= 0 else v for v in sums]  # (nan stays nan)
    if others:
        norms += torch.stack(torch._foreach_norm(others, 2)).float().tolist()
    if not all(math.isfinite(v) for v in norms):
        return False
    typical = max(v / math.sqrt(max(g.numel(), 1)) for v, g in zip(norms, (*by_rows, *others)))
    return max(norms) <= 2.0 ** (SAFE_EXPONENT - 2) and typical >= 2.0 ** (2 - SAFE_EXPONENT)


def rescale(calls: list, sums: dict[str, Tensor], *, in_place: bool = True,
            rows: dict[int, tuple[Tensor, Tensor]] | None = None) -> Tensor | None:
    """Divide the output gradients of one backward (each call's `.grads` list; replaced where a
    gradient is divided out of place) by one power of two near their largest magnitude, and return
    it (a 0-d float32 tensor, on their device; no host read). `sums`: autograd's S, never divided.
    `rows` (a dict) receives {id: (gradient, its squared row norms)} from the CPU check (`clearly_safe`)
    where that settles the backward (nothing is divided, so they are the norms' own).

    Cost on the CPU: one norm pass, which settles most backwards (`clearly_safe`); else, and on an
    accelerator, one min/max pass over the gradients, and one multiply pass where the scaling is needed
    (always on an accelerator, which must not wait for the host to decide). None (no scaling) when
    a gradient is float16 (its range cannot need it, and scaling could push its small values below
    float16's normal range) or float64, or, on the CPU, when the largest magnitude is within
    2^-32 .. 2^32 or every gradient is zero. in_place=False divides every gradient out of place
    (memory="low": autograd still uses them). Zeros never choose the scale: a layer whose output
    gradient is all zero (a LoRA adapter at initialisation) leaves it to the others.
    """
    grads = [g for c in calls for g in (c.grads or ()) if g is not None]
    if not grads or any(g.dtype not in (torch.float32, torch.bfloat16) for g in grads):
        return None
    if grads[0].device.type == "cpu":
        if clearly_safe(grads, rows):
            return None
        if rows:
            rows.clear()
    # |x| = mantissa * 2^exponent, mantissa in [0.5, 1): the largest exponent of every gradient's
    # min and max gives a scale above the largest |x|. frexp gives exponent 0 for 0, which would
    # win over the negative exponents of tiny gradients (losses x1e-30 with one all-zero output
    # gradient, e.g. a LoRA adapter at initialisation): zero extremes take no part
    extremes = torch.stack([m for g in grads for m in g.aminmax()])
    _, exponents = torch.frexp(extremes)
    exponent = exponents.masked_fill(extremes == 0, _NO_EXPONENT).amax()
    if grads[0].device.type == "cpu":  # a host read is free: skip the multiply pass when squares are safe anyway
        e = int(exponent)
        if e == _NO_EXPONENT or -SAFE_EXPONENT <= e <= SAFE_EXPONENT:  # every gradient zero, or safe
            return None
    scale = torch.exp2(exponent.clamp(-126, 126))  # an int exponent: float32, exact
    # in place where that is safe (a tensor owning its storage, seen once, not autograd's S for some
    # parameter); out of place for views (an expanded seed, a view of another gradient) and those,
    # and first, before any storage they share changes
    owned, views, seen = [], [], set()
    keep = {id(t) for s in sums.values() for t in (s, s._base) if t is not None}
    for g in grads:
        if id(g) in seen:
            continue
        seen.add(id(g))
        (owned if in_place and g._base is None and g.is_contiguous() and id(g) not in keep else views).append(g)
    scaled = dict(zip(map(id, views), torch._foreach_div(views, scale))) if views else {}
    if owned:
        torch._foreach_div_(owned, scale)
    if scaled:
        for c in calls:
            if c.grads:
                c.grads = [None if g is None else scaled.get(id(g), g) for g in c.grads]
    return scale


def reuse_row_sq_norms(representations, rows: dict[int, tuple[Tensor, Tensor]]) -> None:
    """Hand the squared row norms `rescale` formed (`rows`) to each Factored map among `representations`
    (also through a bias's) whose output gradients they are (`Factored.reuse_row_sq_norms`)."""
    for rep in representations if rows else ():
        rep = rep.of if isinstance(rep, FactoredBias) else rep
        if isinstance(rep, Factored):
            rep.reuse_row_sq_norms(rows)

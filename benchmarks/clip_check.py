"""The float64 reference of per-sample clipping, and the check of a method's clipped gradient.

Per-sample clipping: g_i the gradient of sample i's loss, w_i = min(1, C / |g_i|) (|.| the
Euclidean norm over all parameters together), the update (1/B) sum_i w_i g_i.

The reference materialises the per-sample gradients with torch.func (vmap over grad, written here
and not taken from gradalign) in float64 on a float64 copy of the model, a few samples at a time
(their norms first, then the weighted sum), so that its own rounding is far below a float32
method's. `check` says whether a method's result matches it.

A batch where some sample sits at a kink of the model (a ReLU pre-activation within float32
rounding of 0: the wide MLP's seed-0 batch of 256 has one at -2.8e-8) has no reference: float32
and float64 take different branches there, and each is a valid gradient of its own arithmetic.
The reference therefore also computes every per-sample gradient in float32 (on the given model)
and raises AtKink for a batch where one differs from its float64 value by more than
BRANCH_TOLERANCE (relative); the caller draws another batch.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

LossFn = Callable[[Tensor, Tensor], Tensor]  # (output, targets) -> (B,) per-sample losses

# A float32 method that computes the same sum has a relative error of about 1e-6 (the wide MLP,
# B = 256: 4e-7; the transformers 1e-6 to 3e-6); a wrong clip factor or a missing term moves it
# by 1e-3 or more.
TOLERANCE = 1e-4
# float32 per-sample gradients are within 1e-6 of float64 (relative) away from kinks; the wide MLP's
# sample at a kink is 3e-2 away
BRANCH_TOLERANCE = 1e-4


class AtKink(ValueError):
    """Some samples' float32 and float64 gradients differ: they sit at a kink (see the module)."""

    def __init__(self, samples: list[int], deviation: float):
        super().__init__(f"sample(s) {samples} at a kink: float32 per-sample gradient {deviation:.1e} "
                         "(relative) away from float64")
        self.samples, self.deviation = samples, deviation


@dataclass
class Reference:
    """norms (B,) float64: |g_i|; clip: C; grad {name: float64 tensor}: (1/B) sum_i w_i g_i."""
    norms: Tensor
    clip: float
    grad: dict[str, Tensor]


def per_sample_gradients(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """{name: (b, *param.shape)}: each sample's gradient of its loss, by torch.func vmap(grad)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    rest = {**{n: p.detach() for n, p in model.named_parameters() if not p.requires_grad},
            **dict(model.named_buffers())}

    def sample_loss(p: dict, xi: Tensor, yi: Tensor) -> Tensor:
        return loss_fn(functional_call(model, {**p, **rest}, (xi.unsqueeze(0),)), yi.unsqueeze(0)).sum()

    return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)


def norms_of(grads: dict[str, Tensor]) -> Tensor:
    """(b,): |g_i| over all parameters together."""
    return torch.stack([g.flatten(1).square().sum(1) for g in grads.values()]).sum(0).sqrt()


def clip_factors(norms: Tensor, clip: float) -> Tensor:
    """(b,): w_i = min(1, C / |g_i|) (1 where |g_i| = 0)."""
    return torch.where(norms > clip, clip / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.ones_like(norms))


def float64_norms(model: nn.Module, model64: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor,
                  chunk: int) -> Tensor:
    """(B,) float64 |g_i|; raises AtKink where a float32 g_i is more than BRANCH_TOLERANCE away."""
    norms, deviations = [], []
    for i in range(0, x.shape[0], chunk):
        xs, ys = x[i:i + chunk], y[i:i + chunk]
        grads = per_sample_gradients(model64, loss_fn, xs.double() if xs.is_floating_point() else xs, ys)
        grads32 = per_sample_gradients(model, loss_fn, xs, ys)
        norms.append(norms_of(grads))
        deviations.append(norms_of({n: grads32[n].double() - g for n, g in grads.items()}) / norms[-1])
    norms, deviation = torch.cat(norms), torch.cat(deviations)
    if not (deviation <= BRANCH_TOLERANCE).all():
        raise AtKink((~(deviation <= BRANCH_TOLERANCE)).nonzero().flatten().tolist(), deviation.max().item())
    return norms


def reference(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, clip: float | None = None,
              chunk: int = 16) -> Reference:
    """The clipped mean gradient in float64, `chunk` samples at a time; clip=None takes C = the
    median of the per-sample norms (about half the samples clipped). Raises AtKink for a batch
    with a sample at a kink (see the module)."""
    model64 = copy.deepcopy(model).double()
    norms = float64_norms(model, model64, loss_fn, x, y, chunk)
    x64 = x.double() if x.is_floating_point() else x
    parts = [(x64[i:i + chunk], y[i:i + chunk]) for i in range(0, x.shape[0], chunk)]
    if clip is None:
        clip = norms.median().item()
    total: dict[str, Tensor] = {}
    start = 0
    for xs, ys in parts:
        grads = per_sample_gradients(model64, loss_fn, xs, ys)
        w = clip_factors(norms[start:start + xs.shape[0]], clip)
        start += xs.shape[0]
        for name, g in grads.items():
            term = torch.tensordot(w, g, dims=1)
            total[name] = total[name] + term if name in total else term
    return Reference(norms, clip, {name: g / x.shape[0] for name, g in total.items()})


def relative_error(grad: dict[str, Tensor], ref: Reference) -> float:
    """|g - g_ref| / |g_ref| over all parameters together (float64)."""
    diff = sum((grad[n].double() - r).square().sum() for n, r in ref.grad.items())
    return (diff / sum(r.square().sum() for r in ref.grad.values())).sqrt().item()


def check(grad: dict[str, Tensor | None], ref: Reference, tolerance: float = TOLERANCE) -> str | None:
    """None when `grad` ({name: the method's clipped mean gradient}) matches the reference within
    `tolerance` (relative error over all parameters); else what is wrong, in a few words."""
    missing = [n for n in ref.grad if grad.get(n) is None]
    if missing:
        return f"no gradient for {len(missing)} of {len(ref.grad)} parameters ({', '.join(missing[:3])}" \
               f"{', ...' if len(missing) > 3 else ''})"
    shapes = [n for n, r in ref.grad.items() if grad[n].shape != r.shape]
    if shapes:
        return f"wrong shape for {', '.join(shapes[:3])}"
    error = relative_error(grad, ref)
    if not error <= tolerance:  # also NaN
        return f"relative error {error:.1e}"
    return None

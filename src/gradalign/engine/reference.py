"""The straightforward reference: per-sample gradients with torch.func (vmap over grad).

It materialises the (B, P) per-sample gradients, so it is slow and memory-hungry, but it
is obviously right. Tests compare the engine against it; users can call
`compare_with_reference` to confirm that the engine handles their own model.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

LossFn = Callable[[Tensor, Tensor], Tensor]  # (output, targets) -> (B,) per-sample losses


def reference_gradients(model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn, *,
                         vectorize: bool = True) -> dict[str, Tensor]:
    """{param name: (B, *param.shape)} with g_i = grad of loss_fn(model(x_i), y_i).

    vectorize=False runs torch.func.grad one sample at a time instead of vmap over the batch: for
    models whose forward vmap cannot batch (data-dependent control flow, e.g. Hugging Face models
    that check their attention masks), at the cost of B forwards.
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b for n, b in model.named_buffers()}

    def sample_loss(p: dict, x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, {**p, **frozen, **buffers}, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0)).sum()

    if vectorize:
        return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, inputs, targets)
    rows = [grad(sample_loss)(params, x, y) for x, y in zip(inputs, targets)]
    return {n: torch.stack([r[n] for r in rows]) for n in params}


def reference_statistics(model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn,
                         weights: Tensor | None = None, *, vectorize: bool = True) -> dict:
    """Every statistic of GradientStats, from materialised per-sample gradients.

    Returns a dict with norms (B,), cosines (B,), mean_grad {name: tensor},
    grad_sq_sum {name: tensor} and weighted_grad {name: (1/B) sum_i w_i g_i}.
    """
    return statistics_of(reference_gradients(model, inputs, targets, loss_fn, vectorize=vectorize), weights)


def statistics_of(grads: dict[str, Tensor], weights: Tensor | None = None) -> dict:
    """`reference_statistics` from given per-sample gradients {name: (B, *param.shape)}."""
    first = next(iter(grads.values()))
    B = first.shape[0]
    w = torch.ones(B, device=first.device, dtype=first.dtype) if weights is None else weights
    flat = torch.cat([g.reshape(B, -1) for g in grads.values()], dim=1)  # (B, P)
    mean = flat.mean(0)
    norms = flat.norm(dim=1)
    denominator = norms * mean.norm()
    cosines = torch.where(denominator > 0, flat @ mean / denominator.clamp_min(torch.finfo(flat.dtype).tiny),
                          torch.zeros_like(norms))
    return {
        "norms": norms,
        "cosines": cosines,
        "mean_grad": {n: g.mean(0) for n, g in grads.items()},
        "grad_sq_sum": {n: g.square().sum(0) for n, g in grads.items()},
        "weighted_grad": {n: torch.tensordot(w.to(g.dtype), g, dims=1) / B for n, g in grads.items()},
    }


def compare_with_reference(model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn, *,
                           vectorize: bool = True) -> dict[str, float]:
    """Largest absolute difference between the engine and the torch.func reference, per statistic
    (vectorize=False: the reference one sample at a time, see `reference_gradients`).

    Example:
        ```python
        errors = compare_with_reference(model, x, y, lambda out, y: F.cross_entropy(out, y, reduction="none"))
        assert max(errors.values()) < 1e-4
        ```
    """
    from gradalign.engine.capture import PerSampleGradients

    ref = reference_statistics(model, inputs, targets, loss_fn, vectorize=vectorize)
    saved = {n: p.grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = None
    engine = PerSampleGradients(model)
    try:
        stats = engine.backward(loss_fn(model(inputs), targets))
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    finally:
        engine.remove()
        for n, p in model.named_parameters():
            p.grad = saved[n]

    def worst(a: dict, b: dict) -> float:
        return max(((a[n] - b[n]).abs().max().item() for n in b), default=0.0)

    return {
        "norms": (stats.norms - ref["norms"]).abs().max().item(),
        "cosines": (stats.cosines - ref["cosines"]).abs().max().item(),
        "grad_sq_sum": worst(stats.grad_sq_sum, ref["grad_sq_sum"]),
        "mean_grad": worst({n: g for n, g in grads.items() if g is not None}, ref["mean_grad"]),
    }


def check_model(model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn) -> dict[str, float]:
    """Deprecated alias of `compare_with_reference` (it compares, it does not validate: for
    that, see `ga.validate`). Will be removed in the next release."""
    warnings.warn("gradalign.check_model is renamed compare_with_reference; check_model will be removed "
                  "in the next release", DeprecationWarning, stacklevel=2)
    return compare_with_reference(model, inputs, targets, loss_fn)

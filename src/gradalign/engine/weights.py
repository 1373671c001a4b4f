"""The (B,) weights of one backward: none (ones), a tensor, or a weighting's output, checked."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Weights = Tensor | Callable | None


def resolve_weights(weights: Weights, stats, losses: Tensor, verify: bool) -> Tensor:
    """(B,) weights in the statistics' precision (at least float32). Finiteness is checked
    where that costs no host sync (weights on the CPU) or with verify=True."""
    B = losses.shape[0]
    dtype = stats.dtype  # the statistics' precision, whatever the losses' dtype
    if weights is None:
        return torch.ones(B, device=losses.device, dtype=dtype)
    w = weights(stats) if callable(weights) else weights
    if not isinstance(w, Tensor) or w.shape != (B,):
        got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"weights must be a tensor of shape ({B},), got {got}")
    # (a weighting that guarantees finite weights, e.g. GASW with its fallback, says so)
    checked = (w.device.type == "cpu" or verify) and not getattr(weights, "finite_weights", False)
    if checked and not bool(torch.isfinite(w).all()):
        raise ValueError("weights contain NaN or infinite values")
    w = w.detach() if w.requires_grad else w
    return w if w.device == losses.device and w.dtype == dtype else w.to(device=losses.device, dtype=dtype)

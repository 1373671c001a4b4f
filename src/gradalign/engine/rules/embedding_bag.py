"""nn.EmbeddingBag: one bag of rows per sample, 2-D input (B, N) or 1-D input with offsets, mode
sum, mean or max, per_sample_weights (mode sum), padding_idx, include_last_offset.

Sample i's output is a reduction of the rows W[idx_ij] of its bag, so its gradient is rows again
(representations.IndexedRows, index (B, N) padded to the longest bag):

    sum:  g_i(W) = sum_j w_ij onehot(idx_ij) d_i^T     (w_ij = per_sample_weights, else 1)
    mean: g_i(W) = (1 / n_i) sum_j onehot(idx_ij) d_i^T  (n_i: the bag's entries other than padding_idx)
    max:  g_i(W)[idx_ij, k] = d_ik where entry j holds the bag's maximum of feature k (the first
          such entry, as torch picks it)

Entries equal to padding_idx, and the padding of shorter bags, contribute nothing; an empty bag's
sample has a zero gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradalign.engine.representations import IndexedRows


@dataclass
class _Bags:
    index: Tensor         # (B, N) rows of each bag, 0 where padded
    weight: Tensor        # (B, N) each entry's multiplier (0 for padding and padding_idx entries)
    valid: Tensor         # (B, N) bool: a real entry other than padding_idx


def _bind(args: tuple, kwargs: dict) -> tuple:
    values = {**dict(zip(("input", "offsets", "per_sample_weights"), args)), **kwargs}
    return values.get("input"), values.get("offsets"), values.get("per_sample_weights")


def _padded(module: nn.EmbeddingBag, flat: Tensor, offsets: Tensor, weights: Tensor | None) -> tuple:
    """1-D input with offsets -> (B, N) index, per-entry weights and a mask of the real entries."""
    starts = offsets[:-1] if module.include_last_offset else offsets
    ends = offsets[1:] if module.include_last_offset else torch.cat([offsets[1:], offsets.new_tensor([flat.numel()])])
    lengths = ends - starts
    N = int(lengths.max()) if lengths.numel() else 0
    position = starts.unsqueeze(1) + torch.arange(N, device=flat.device)
    real = torch.arange(N, device=flat.device) < lengths.unsqueeze(1)
    position = torch.where(real, position, 0).clamp_max(max(flat.numel() - 1, 0))
    index = torch.where(real, flat[position], 0) if flat.numel() else position
    w = None if weights is None else torch.where(real, weights[position], 0)
    return index, w, real


def embedding_bag_capture(module: nn.EmbeddingBag, args: tuple, kwargs: dict, batch_dim: int) -> tuple:
    """(index (B, N), _Bags): the bags padded to the longest, with each entry's multiplier."""
    data, offsets, weights = _bind(args, kwargs)
    data = data.detach()
    weights = None if weights is None else weights.detach()
    if data.dim() == 2:
        index, real = data, torch.ones_like(data, dtype=torch.bool)
    else:
        index, weights, real = _padded(module, data, offsets.detach(), weights)
    valid = real if module.padding_idx is None else real & (index != module.padding_idx)
    if module.mode == "mean":
        count = valid.sum(1, keepdim=True).clamp_min(1)
        multiplier = valid / count
    else:
        multiplier = valid.to(torch.float32)
        if weights is not None:
            multiplier = multiplier * weights
    return index, _Bags(index, multiplier, valid)


def _max_entries(module: nn.EmbeddingBag, bags: _Bags) -> Tensor:
    """(B, N, dim) one-hot over each bag's entries: which holds the maximum of each feature."""
    values = module.weight.detach()[bags.index]  # (B, N, dim)
    values = values.masked_fill(~bags.valid.unsqueeze(-1), float("-inf"))
    first = values.argmax(1, keepdim=True)  # the first maximal entry, as torch's max mode picks it
    picked = torch.zeros_like(values, dtype=torch.bool).scatter_(1, first, True)
    return picked & bags.valid.unsqueeze(-1)


def embedding_bag_rule(module: nn.EmbeddingBag, args: tuple, grad_output: Tensor) -> dict:
    _, bags = args
    if not module.weight.requires_grad:
        return {}
    d = grad_output.unsqueeze(1)  # (B, 1, dim): every entry of a bag sees its sample's gradient
    if module.mode == "max":
        D = d * _max_entries(module, bags).to(d.dtype)
    else:
        D = d * bags.weight.unsqueeze(-1).to(d.dtype)
    return {"weight": IndexedRows(bags.index, D, module.num_embeddings)}

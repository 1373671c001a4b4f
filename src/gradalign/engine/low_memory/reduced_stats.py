"""ReducedStats: the statistics of a memory="low" backward, which keeps (B,) sums, not factors.

engine/low_memory/backward.py reduces every layer inside the backward to |g_i|^2 (and, for a weighting
whose `needs` names "cosines", <g_i, S> and |S|^2), summed in float64 (float32 on MPS), so the
ratios here are formed without overflow or underflow for any loss scale whose gradients fit
float32. Everything else a GradientStats offers needs the per-sample gradients (sums over
samples of parameter size, grad_sq_sum, dots with other vectors, weighted sums): reading it
raises StatisticNotKeptError, which says to use the default memory mode.
"""
from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from gradalign.errors import StatisticNotKeptError


class ReducedStats:
    """Norms (and cosines where they were asked for) of one memory="low" backward.

    Attributes, as in GradientStats: batch_size, global_batch_size (B), dtype, sq_norms (B,),
    norms (B,), weights (B,) (set by the engine), trainable_names; with cosines: cosines (B,),
    dots_with_mean (B,), mean_grad_sq_norm (), mean_grad_norm (), scaled_sums().
    """

    def __init__(self, sq_norms: Tensor, dots: Tensor | None, sum_sq: Tensor | None, dtype: torch.dtype):
        self._sq, self._dots, self._sum_sq = sq_norms, dots, sum_sq  # float64 sums (float32 on MPS)
        self.batch_size = self.global_batch_size = sq_norms.shape[0]
        self.dtype = dtype
        self.weights: Tensor | None = None
        self.trainable_names: tuple = ()

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        raise StatisticNotKeptError(
            f"{name} is not kept by engine.backward(..., memory='low'): that backward reduces each layer to "
            "per-sample norms (and cosines, for a weighting whose `needs` names 'cosines') and frees its "
            "gradients; call backward with memory='default' (the default) to read it")

    def _cosine_sums(self) -> tuple[Tensor, Tensor]:
        if self._dots is None:
            raise StatisticNotKeptError(
                "the cosines were not reduced in this memory='low' backward: give the weighting a `needs` "
                "attribute naming 'cosines' (as ga.GASW has), or use memory='default'")
        return self._dots, self._sum_sq

    def sum_over_ranks(self, value: Tensor) -> Tensor:
        return value  # (memory='low' is single-process)

    @cached_property
    def sq_norms(self) -> Tensor:
        return self._sq.to(self.dtype)

    @cached_property
    def norms(self) -> Tensor:
        return self._sq.clamp_min(0).sqrt().to(self.dtype)

    @cached_property
    def cosines(self) -> Tensor:
        dots, sum_sq = self._cosine_sums()
        denominator = self._sq.clamp_min(0).sqrt() * sum_sq.clamp_min(0).sqrt()
        return torch.where(denominator > 0, dots / denominator, 0.0).to(self.dtype)

    @cached_property
    def dots_with_mean(self) -> Tensor:
        return (self._cosine_sums()[0] / max(self.batch_size, 1)).to(self.dtype)

    @cached_property
    def mean_grad_sq_norm(self) -> Tensor:
        return (self._cosine_sums()[1] / max(self.batch_size, 1) ** 2).to(self.dtype)

    @cached_property
    def mean_grad_norm(self) -> Tensor:
        return (self._cosine_sums()[1].clamp_min(0).sqrt() / max(self.batch_size, 1)).to(self.dtype)

    def scaled_sums(self) -> tuple[Tensor, Tensor, Tensor]:
        """(|g_i|^2, <g_i, S>, |S|^2), all divided by one power of two near the largest of them."""
        dots, sum_sq = self._cosine_sums()
        largest = torch.maximum(self._sq.abs().amax() if self._sq.numel() else sum_sq.abs(), sum_sq.abs())
        _, exponent = torch.frexp(largest)
        c = torch.where(largest > 0, torch.exp2(-exponent.to(largest.dtype)), 1.0)  # (no host read)
        return tuple((t * c).to(self.dtype) for t in (self._sq, dots, sum_sq))

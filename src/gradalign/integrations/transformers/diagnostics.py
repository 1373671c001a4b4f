"""The method's own numbers in the Trainer's log: kept on the device between two logs, read
(and, under data parallel, summed over ranks in one all-reduce) only when the Trainer logs.

GASW / GDSW, per training step t with global batch B_t and weights w_i (sum_i w_i = B_t):
    {name}_weight_entropy       mean over the steps since the last log of
                                H_t = -sum_i p_i log p_i / log B_t, p_i = w_i / B_t
                                (1: uniform weights, 0: one sample carries the step)
    {name}_zero_weight_fraction the fraction of those steps' samples whose weight is 0
    {name}_fallbacks            steps so far that fell back to uniform weights (cumulative)
GAGA (GSNRAccumulator):
    gaga_samples_per_step       mean samples per optimizer step closed since the last log
    gaga_snr                    the SNR after the latest increment
    gaga_optimizer_steps        optimizer steps so far (cumulative)
Sums over samples are local per rank and summed over ranks at the log; every rank takes the
same steps, so every rank logs the same numbers.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

import gradalign as ga


class MethodLog:
    """Per-step accumulation of the numbers above for `weighting` or `accumulation`."""

    def __init__(self, weighting: Any, accumulation: ga.GSNRAccumulator | None):
        self.weighting, self.accumulation = weighting, accumulation
        self.name = type(weighting).__name__.lower() if isinstance(weighting, (ga.GASW, ga.GDSW)) else None
        self._reset()

    def _reset(self) -> None:
        self.steps = 0
        self._sums: Tensor | None = None            # (3,) [sum_t H_t, zero weights, samples] on the device
        self._closed = len(self.accumulation.samples_per_step) if self.accumulation is not None else 0

    def weighted_step(self, stats: ga.GradientStats) -> None:
        """After a weighted backward: this rank's part of the step's entropy and zero count."""
        if self.name is None:
            return
        w = self.weighting.last_weights.detach().double()          # (B_r,), summing to B over every rank
        B = stats.global_batch_size
        p = w / B
        terms = torch.where(p > 0, -p * torch.log(p.clamp_min(1e-300)), 0.0).sum()
        entropy = terms / math.log(B) if B > 1 else terms + 1.0     # one sample (one process): uniform
        step = torch.stack([entropy, (w == 0).sum().double(), w.new_tensor(float(w.numel()))])
        self._sums = step if self._sums is None else self._sums + step
        self.steps += 1

    def accumulation_step(self) -> None:
        """After a GAGA increment (nothing on the device: the accumulator holds global sums)."""
        self.steps += 1

    def flush(self, process_group: Any) -> dict[str, float]:
        """The numbers since the previous flush (empty when no step was taken), then reset.
        Under data parallel every rank must call it at the same steps (the Trainer logs on
        every rank at once)."""
        if self.steps == 0:
            return {}
        out: dict[str, float] = {}
        if self.name is not None and self._sums is not None:
            sums = self._sums
            if process_group is not None:
                sums = ga.distributed.all_reduce_flat([sums], process_group)[0]
            entropy, zeros, samples = (float(v) for v in sums)
            out[f"{self.name}_weight_entropy"] = entropy / self.steps
            out[f"{self.name}_zero_weight_fraction"] = zeros / max(samples, 1.0)
            out[f"{self.name}_fallbacks"] = float(self.weighting.fallbacks)
        if self.accumulation is not None:
            acc = self.accumulation
            closed = acc.samples_per_step[self._closed:]
            if closed:
                out["gaga_samples_per_step"] = sum(closed) / len(closed)
            out["gaga_snr"] = acc.last_snr
            out["gaga_optimizer_steps"] = float(len(acc.samples_per_step))
        self._reset()
        return out


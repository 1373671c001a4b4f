"""Data parallel: the few collectives that make per-sample statistics global.

With R ranks, rank r holding B_r samples, every statistic the engine reports is a ratio of
sums over samples, so making it global is summing those sums over ranks before the ratio
is formed (in `GradientStats`, the one place ratios are formed). What is summed, per step:

    plain mean gradient     [S_r, B_r]                 one all-reduce, P + 1 numbers
    GASW / GDSW             [S_r, B_r]                 P + 1   (cosines need S = sum_i g_i)
                            sum_i raw_i                1       (the weights' normaliser)
                            sum_i w_i g_i              P       (the weighted p.grad)
    GAGA (write_grad=False) [S_r, sum_i g_i**2, B_r]   one all-reduce, 2P + 1 numbers
    norms only              nothing                    (|g_i| is per sample, stays local)

P is the number of trainable parameters. Per-sample quantities (norms, <g_i, S>, cosines,
weights) stay on the rank that holds the sample: <g_i, S> for the global S comes from the
layer factors (d_i^T S a_i), never from the B x B Gram matrix, which only pairs local
samples. Parameter-sized tensors are flattened into one buffer per call (float32 at least,
so a bfloat16 model sums in float32) and split back.

Why not fewer: the weighted gradient sum_i w_i g_i depends on every sample's cosine to the
GLOBAL S, so it cannot be reduced together with S; it is linear in the weights, so the
normaliser could ride along with it (all-reduce the unnormalised sum and sum_i raw_i
together, divide after), saving the 1-number call, but that needs a two-phase weights
protocol for every weights callable; a latency-bound scalar is not worth that.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradalign.errors import GradAlignError


class WeakGroup:
    """A `process_group` attribute held by weak reference (a descriptor: `process_group =
    WeakGroup()` in the class, then plain assignment and reads), so that an engine, its
    statistics or a GWA monitor never keep a process group alive: the group lives as long as
    torch.distributed (until `destroy_process_group`) or a DDP model holds it. A gloo group that
    something keeps alive past `destroy_process_group` runs its worker threads into interpreter
    shutdown, and a worker freeing the last collectives' tensors there (they need the GIL) aborts
    the process ("terminate called without an active exception", SIGABRT). Reading the attribute
    after the group was freed raises GradAlignError; a group that cannot be weakly referenced is
    held as before."""

    def __set_name__(self, owner, name: str) -> None:
        self._slot = f"_{name}_ref"

    def __set__(self, obj, group) -> None:
        if group is None:
            ref = None
        else:
            try:
                ref = weakref.ref(group)
            except TypeError:
                ref = lambda: group  # held strongly: no weak reference possible
        obj.__dict__[self._slot] = ref

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        ref = obj.__dict__.get(self._slot)
        if ref is None:
            return None
        group = ref()
        if group is None:
            raise GradAlignError(
                f"the process group of this {type(obj).__name__} no longer exists (torch.distributed."
                "destroy_process_group was called, or nothing else held it): it is held by weak reference "
                "so that it never outlives the group; create a new one for a new group")
        return group


def resolve_group(model: nn.Module, process_group: Any) -> Any:
    """The group to reduce over: `process_group`, else a DistributedDataParallel model's own
    group, else None (single process: no communication at all)."""
    if isinstance(process_group, (str, bytes, int, float)):  # e.g. "gloo": a backend, not a group
        raise ValueError(
            f"process_group must be a torch.distributed process group (dist.group.WORLD, or one from "
            f"dist.new_group(backend=...)), got the {type(process_group).__name__} {process_group!r}; the backend "
            "is chosen by dist.init_process_group(backend=...) or dist.new_group(backend=...)")
    if process_group is not None:
        return process_group
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.process_group
    return None


def active_group() -> Any:
    """torch.distributed's WORLD when several processes were launched (torchrun, `accelerate
    launch`, Lightning's DDP) and initialised it, else None (one process: no communication)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def world_size(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce_flat(tensors: list[Tensor], group: Any) -> list[Tensor]:
    """Sum every tensor over the ranks of `group` in ONE all-reduce; new tensors, same shapes
    and dtypes. All tensors must be on one device (the parameters')."""
    if not tensors:
        return []
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].view(t.shape).to(t.dtype))
        start += t.numel()
    return out


def all_reduce_dicts(dicts: list[dict[str, Tensor]], count: int | None, group: Any,
                     device: torch.device | None) -> tuple[list[dict[str, Tensor]], int | None]:
    """Sum several {name: tensor} dicts (and an integer count) over ranks in one all-reduce.

    Every rank must pass the same names in the same order (the same model)."""
    tensors = [t for d in dicts for t in d.values()]
    if count is not None:
        tensors.append(torch.tensor([float(count)], device=tensors[0].device if tensors else device))
    reduced = all_reduce_flat(tensors, group)
    out, k = [], 0
    for d in dicts:
        out.append(dict(zip(d, reduced[k:k + len(d)])))
        k += len(d)
    total = int(round(float(reduced[-1]))) if count is not None else None
    return out, total


def all_gather_rows(rows: Tensor, group: Any) -> Tensor:
    """Concatenate (n_r, k) tensors of every rank in rank order; n_r may differ between ranks."""
    world = dist.get_world_size(group)
    n = torch.tensor([rows.shape[0]], device=rows.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    padded = rows.new_zeros((max(sizes),) + tuple(rows.shape[1:]))
    padded[:rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def broadcast_parameters(model: nn.Module, group: Any = None, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers to every rank (what DDP does at construction):
    the start of data-parallel training without a DDP wrapper."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=dist.get_global_rank(group, src) if group is not None else src, group=group)

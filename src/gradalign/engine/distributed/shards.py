"""Sharded parameters (FSDP2): where each rank's part of a parameter lies, and the collectives
that turn per-rank sums of full-size tensors into those parts.

A parameter sharded by `fully_shard` is a DTensor on a 1-D mesh of R ranks with placement
Shard(d): along dim d (size n) rank r holds the rows [r c, min((r + 1) c, n)), c = ceil(n / R),
torch.chunk's split (the last ranks may hold fewer rows, or none). FSDP reduce-scatters
gradients from a buffer laid out rank-major: for every rank, the parameters' parts one after
the other, each padded to c rows (Shard(d > 0) needs d divisible by R and is moved to dim 0
first), so one `reduce_scatter_tensor` hands each rank exactly its parts. `reduce_scatter`
below builds the same layout, so each rank receives the same elements FSDP's own reduction
would give it (as a sum, in float32 at least, not FSDP's average: the engine divides by the
global batch itself).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.5: no public DTensor, so nothing is sharded
    class DTensor:  # noqa: D101 - a stand-in no tensor is an instance of
        pass


@dataclass(frozen=True)
class ShardSpec:
    """One sharded parameter: its global shape and stride, the mesh and placements of its
    DTensor, the sharded dim, and this rank's part."""

    mesh: object
    placements: tuple
    shape: torch.Size
    stride: tuple[int, ...]
    dim: int
    rank: int
    world: int

    @classmethod
    def of(cls, p: DTensor) -> "ShardSpec":
        mesh = p.device_mesh
        return cls(mesh, tuple(p.placements), p.shape, p.stride(), p.placements[0].dim, mesh.get_local_rank(),
                   mesh.size())

    @property
    def rows(self) -> int:
        """c = ceil(n / R): the rows of every rank's padded part."""
        return math.ceil(self.shape[self.dim] / self.world)

    def bounds(self, rank: int | None = None) -> tuple[int, int]:
        """(first row, number of rows) of `rank`'s part along the sharded dim."""
        rank = self.rank if rank is None else rank
        start = rank * self.rows
        return start, max(0, min(self.rows, self.shape[self.dim] - start))

    @property
    def local_shape(self) -> torch.Size:
        shape = list(self.shape)
        shape[self.dim] = self.bounds()[1]
        return torch.Size(shape)

    def part(self, full: Tensor) -> Tensor:
        """This rank's part of a full-size tensor, as a new contiguous tensor."""
        start, length = self.bounds()
        return full.narrow(self.dim, start, length).clone(memory_format=torch.contiguous_format)

    def rank_major(self, full: Tensor) -> Tensor:
        """(R, padded part numel): row r is rank r's part, padded as FSDP pads it."""
        n, R = self.shape[self.dim], self.world
        if self.dim != 0:  # FSDP requires even sharding here: chunks stacked on dim 0
            return torch.cat(torch.chunk(full, R, dim=self.dim), 0).reshape(R, -1)
        if n == R * self.rows:
            return full.reshape(R, -1)
        padded = full.new_zeros((R * self.rows, *full.shape[1:]))
        padded[:n] = full
        return padded.view(R, -1)

    def padded_numel(self) -> int:
        return math.prod(self.shape) // self.shape[self.dim] * self.rows

    def from_padded(self, flat: Tensor) -> Tensor:
        """This rank's part from its padded slot (the padding rows are last in dim-0 order)."""
        local = self.local_shape
        return flat[:math.prod(local)].view(local)

    def dtensor(self, local: Tensor) -> DTensor:
        """A DTensor with the parameter's spec around this rank's part."""
        return DTensor.from_local(local, self.mesh, self.placements, run_check=False, shape=self.shape,
                                  stride=self.stride)


def reduce_scatter(tensors: list[Tensor], specs: list[ShardSpec], group, count: int | None = None,
                   ) -> tuple[list[Tensor], int | None]:
    """Each rank's parts of the sums over ranks of full-size `tensors` (one per spec), in ONE
    reduce_scatter_tensor, and `count` summed over ranks riding along (a column of the buffer
    that every rank receives). Returns ([local part of each sum], total count or None); the parts
    are float32 at least, views of one buffer."""
    R = specs[0].world
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    columns = [spec.rank_major(t.detach().to(dtype)) for t, spec in zip(tensors, specs)]
    if count is not None:
        columns.append(torch.full((R, 1), float(count), dtype=dtype, device=columns[0].device))
    buffer = torch.cat(columns, 1) if len(columns) > 1 else columns[0].contiguous()
    del columns
    out = buffer.new_empty(buffer.shape[1])
    # (torch >= 2.12 names it reduce_scatter_single; reduce_scatter_tensor is deprecated there)
    reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    reduce_scatter_single(out, buffer.view(-1), op=dist.ReduceOp.SUM, group=group)
    parts, start = [], 0
    for spec in specs:
        size = spec.padded_numel()
        parts.append(spec.from_padded(out[start:start + size]))
        start += size
    return parts, (int(round(float(out[-1]))) if count is not None else None)


def local_part(t: Tensor) -> Tensor:
    """The tensor this rank holds: a DTensor's local part, any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_value(t: Tensor) -> Tensor:
    """The whole tensor on every rank (an all-gather for a DTensor); a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def global_sums(values: list[Tensor]) -> Tensor:
    """(k,) float64: the sums of k tensors over all their elements; a DTensor's elements summed
    over its shards (one all-reduce for all of them over their mesh), a plain tensor's as they
    are (it is the same on every rank)."""
    sharded = [k for k, v in enumerate(values) if isinstance(v, DTensor)]
    out = torch.stack([local_part(v).double().sum() for v in values]) if values else torch.zeros(0,
                                                                                                   dtype=torch.float64)
    if sharded:
        partial = out[sharded]
        dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=values[sharded[0]].device_mesh.get_group())
        out[sharded] = partial
    return out


def full_norm(t: Tensor) -> Tensor:
    """|t| over all its elements (of every shard for a DTensor: one scalar all-reduce), float32 at least."""
    dtype = torch.promote_types(t.dtype, torch.float32)
    if not isinstance(t, DTensor):
        return torch.linalg.vector_norm(t, dtype=dtype)
    sq = torch.linalg.vector_norm(t.to_local(), dtype=dtype).square()
    dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=t.device_mesh.get_group())
    return sq.sqrt()


def mesh_group(t: Tensor):
    """The process group of a DTensor's (1-D) mesh; None for a plain tensor."""
    return t.device_mesh.get_group() if isinstance(t, DTensor) else None

"""Data-parallel training of one arm: `gradalign train ... --nproc N` (or torchrun).

    gradalign train gasw --arm gasw --param lr=0.003 --nproc 2
    torchrun --nproc_per_node 2 -m gradalign.cli train gasw --arm gasw --param lr=0.003   # the same

Every rank draws the SAME global batch from the same seeded order and keeps its contiguous
shard (`torch.tensor_split`, so rank-major concatenation is the single-process batch): the
global batches, and so the numbers, are those of one process with the same batch size, up
to float summation order. The model is wrapped in DistributedDataParallel (same
initialisation on every rank: DDP broadcasts rank 0's); the baseline and the two-view arms
backpropagate through DDP (the baseline scales each rank's summed loss so that DDP's average
is the global mean also for uneven shards), GASW/GDSW and GAGA through the engine, which
takes DDP's process group and reduces once (DDP's reducer does not run on its backward). The
GWA monitor gathers every rank's scores at each evaluation. Only rank 0 prints and writes
files. Backend: gloo, since the experiments' models train on the CPU (the library itself
works with nccl: `ga.PerSampleGradients(process_group=)` only needs the group). The global
batch must hold at least one sample per rank.

`--shard` shards the model with FSDP2 instead (`torch.distributed.fsdp.fully_shard` on each
child of the model that holds parameters, then on the model): every rank holds its part of
each parameter and of the optimizer's state, the engine takes the mesh's group and writes
p.grad as shards, plain backwards go through FSDP's own reduce-scatter (the same average as
DDP's); the numbers are again those of one process.
"""
from __future__ import annotations

import gc
import os
import sys
import uuid
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class Parallel:
    """This process's place in a data-parallel run."""

    rank: int
    world: int
    group: Any = None
    sharded: bool = False  # FSDP2 (fully_shard) instead of DistributedDataParallel

    def shard(self, t: Tensor) -> Tensor:
        """This rank's contiguous part of a global batch."""
        return torch.tensor_split(t, self.world)[self.rank]

    def sum(self, value: float) -> float:
        """A float summed over the ranks (e.g. the batch loss, so every rank sees divergence)."""
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return float(t)


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(sharded: bool = False) -> Parallel | None:
    """Join the process group torchrun describes (None when not launched by torchrun with > 1 ranks).

    torch.distributed.nn is imported first: its functions take `group=group.WORLD` as a default
    argument, evaluated at import, and imported after the group exists (DDP's constructor imports
    it through torch._dynamo) it would hold the group for the rest of the process (see `finish`)."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) < 2:
        return None
    import torch.distributed.nn  # noqa: F401 - before init_process_group (the docstring says why)
    if not dist.is_initialized():
        dist.init_process_group("gloo")          # the experiments' models are on the CPU
    return Parallel(dist.get_rank(), dist.get_world_size(), dist.group.WORLD, sharded)


def wrap(model: nn.Module, parallel: Parallel) -> nn.Module:
    """What the step trains: the model in DistributedDataParallel, or (sharded) the model itself
    sharded with FSDP2, each child holding parameters a unit, then the model (the same
    initialisation on every rank either way: the seed builds it)."""
    if not parallel.sharded:
        return nn.parallel.DistributedDataParallel(model, process_group=parallel.group, broadcast_buffers=False)
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    mesh = DeviceMesh.from_group(parallel.group, next(model.parameters()).device.type)
    for child in model.children():
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def finish() -> None:
    """Destroy the process group for good while the interpreter runs. Call it once nothing of the
    run holds the group any more (the Parallel, the DDP model): the garbage is collected first
    (DDP models sit in reference cycles), so destroy_process_group frees the group and joins its
    threads. A gloo group left alive runs its worker threads into the interpreter's shutdown,
    where a worker freeing the last collectives (they need the GIL) now and then aborts the
    process: "terminate called without an active exception", SIGABRT."""
    gc.collect()
    dist.destroy_process_group()


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run `python -m gradalign.cli <argv>` on `nproc` local processes as `torchrun --standalone`
    does (torch's launcher API, so no option of ours is read as one of torchrun's); exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"gradalign-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    try:
        elastic_launch(config, sys.executable)("-m", "gradalign.cli", *argv)
    except ChildFailedError as e:
        first = next(iter(e.failures.values()), None)
        return first.exitcode if first is not None and first.exitcode > 0 else 1
    return 0

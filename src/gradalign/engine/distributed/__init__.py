"""Data parallel and sharded models: the collectives that make per-sample statistics global.

    ddp.py            data parallel (one full copy of the model per rank, DDP or none): the
                      flattened all-reduce / all_gather helpers, DDP's group, broadcast_parameters,
                      WeakGroup (a process group attribute that never keeps the group alive)
    fsdp.py           FSDP2 (fully_shard): the model's units, the tensors its forward registers,
                      what the engine refuses (HSDP, tensor parallel, FSDP1)
    shards.py         a sharded parameter's spec, the reduce-scatter into FSDP's layout, and
                      sums and norms over the shards of DTensors (for the methods)

GradientStats over a sharded model is engine/sharded_stats.py (it builds on gradient_stats.py,
which this package sits below).
"""
from gradalign.engine.distributed.ddp import (
    WeakGroup,
    active_group,
    all_gather_rows,
    all_reduce_dicts,
    all_reduce_flat,
    broadcast_parameters,
    resolve_group,
    world_size,
)
from gradalign.engine.distributed.fsdp import (
    Sharding,
    refuse_late_sharding,
    sharding_of,
    unsharded_after_backward,
)
from gradalign.engine.distributed.shards import full_norm, full_value, global_sums, local_part, mesh_group

__all__ = ["Sharding", "WeakGroup", "active_group", "all_gather_rows", "all_reduce_dicts", "all_reduce_flat", "broadcast_parameters",
           "full_norm", "full_value", "global_sums", "local_part", "mesh_group", "refuse_late_sharding", "resolve_group", "sharding_of",
           "unsharded_after_backward", "world_size"]

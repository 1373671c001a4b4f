"""A model sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`) as the engine sees it.

What FSDP2 does, and what the engine does about it:
- Outside forward and backward every managed parameter is a DTensor on a 1-D mesh, Shard(0)
  (or another Shard(d)): `model.named_parameters()` gives those sharded parameters, and they
  are what the optimizer steps and where p.grad must land, as a DTensor of the same spec.
- Each fully_shard module is a unit: its forward pre-hook all-gathers the unit's parameters
  and registers the full ("unsharded") tensors on the modules, in param_dtype under a mixed
  precision policy; its post-forward hook frees them (reshard_after_forward=True). The
  forward, and so autograd's graph, only ever sees the unsharded tensors. The engine records
  them as they are registered (`forward_params`), for what must meet the graph itself
  (watched parameters, the check for parameters used outside their module, verify=True).
- FSDP's backward hooks all-gather a unit again where the backward needs its parameters and
  reshard it after; its post-backward reduce-scatters `unsharded_param.grad`. The engine's
  backward asks autograd for layer-output gradients only, so no unsharded gradient exists and
  FSDP reduces nothing: the engine's reduction (engine/sharded_stats.py) is the
  only one, a reduce-scatter per unit, the same layout as FSDP's (engine/distributed/shards.py).
- A rule that reads parameter VALUES after the backward (`Rule.reads_parameters`: attention's
  projections, the torch.func fallback, watched parameters) runs with its unit all-gathered
  again (`gathered`), then resharded.

Supported: any nesting of fully_shard units, a 1-D mesh (every sharded parameter on the same
one), parameters FSDP ignores (plain tensors, reduced by all-reduce), mixed precision, either
reshard_after_forward. Refused with a reason: HSDP (2-D mesh), tensor parallel (DTensor
parameters FSDP did not shard, or FSDP over a TP mesh), parameters on different meshes, FSDP1.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from gradalign.engine.distributed.shards import DTensor, ShardSpec
from gradalign.errors import ShardingError

try:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import Shard
except ImportError:  # torch < 2.6: no public FSDP2, so nothing is sharded by it
    FSDPModule = FullyShardedDataParallel = Shard = DTensor


@dataclass
class Unit:
    """The parameters FSDP reduces together (those of one fully_shard call), or, with
    `specs` None, the parameters FSDP does not shard (all-reduced like data parallel)."""

    path: str
    names: list[str]
    specs: dict[str, ShardSpec] | None = field(default=None)


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _owners(model: nn.Module) -> dict[str, str | None]:
    """{module path: path of the nearest fully_shard module at or above it (None: none)}."""
    owners: dict[str, str | None] = {}
    for path, module in model.named_modules():
        if isinstance(module, FSDPModule):
            owners[path] = path
        else:
            owners[path] = owners.get(_parent(path)) if path else None
    return owners


def _refusal(name: str, p: DTensor, fsdp: bool) -> str | None:
    mesh, placements = p.device_mesh, tuple(p.placements)
    if not fsdp:
        return (f"parameter {name} is a DTensor ({placements} on a {mesh.ndim}-D mesh) that no fully_shard module "
                "owns: tensor parallel (parallelize_module) and other DTensor parameters are not supported yet; "
                "the engine serves models sharded with torch.distributed.fsdp.fully_shard (FSDP2) on a 1-D mesh")
    if mesh.ndim == 2 and len(placements) == 2 and not isinstance(placements[0], Shard) \
            and isinstance(placements[1], Shard) and placements[1].dim == 0:
        return (f"parameter {name} is sharded on a 2-D mesh {placements} (HSDP: replicate x shard): not supported "
                "yet; shard over a 1-D mesh (fully_shard(module, mesh=init_device_mesh(device, (world,))))")
    if mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard):
        return (f"parameter {name} has placements {placements} on a {mesh.ndim}-D mesh: tensor-parallel placements "
                "(FSDP over a tensor-parallel mesh) and replicated DTensors are not supported yet; the engine serves "
                "fully_shard on a 1-D mesh, Shard(d)")
    return None


def _check_group(mesh_group, process_group) -> None:
    if process_group is None:
        return
    mine, given = dist.get_process_group_ranks(mesh_group), dist.get_process_group_ranks(process_group)
    if sorted(mine) != sorted(given):
        raise ShardingError(
            f"process_group has ranks {given} but the model is sharded over the mesh of ranks {mine}: the "
            "statistics must be reduced over the ranks that shard the model; drop process_group (the engine takes "
            "FSDP's mesh) or pass that mesh's group")


class Sharding:
    """The engine's view of an FSDP2 model: its units, each sharded parameter's spec, the process
    group of the mesh, and the tensors the forward registers in place of the sharded parameters.

    Every fully_shard module is resharded when this is created, so `model.named_parameters()`
    gives the sharded parameters (create the engine between steps, not between a forward and
    its backward).
    """

    def __init__(self, model: nn.Module, process_group: Any = None):
        for module in model.modules():
            if isinstance(module, FullyShardedDataParallel):
                raise ShardingError("FullyShardedDataParallel (FSDP1) flattens the parameters, so no per-parameter "
                                    "gradient can be written: shard with torch.distributed.fsdp.fully_shard (FSDP2)")
            if isinstance(module, FSDPModule):
                module.reshard()
        owners, units, replicated = _owners(model), {}, []
        self.modules = {path: m for path, m in model.named_modules() if isinstance(m, FSDPModule)}
        self.owner_of: dict[str, str | None] = {}  # parameter name -> its unit's path (None: not sharded)
        self.specs: dict[str, ShardSpec] = {}
        meshes = []
        for name, p in model.named_parameters():
            owner = owners.get(_parent(name))
            if isinstance(p, DTensor):
                reason = _refusal(name, p, owner is not None)
                if reason:
                    raise ShardingError(reason)
                spec = self.specs[name] = ShardSpec.of(p)
                meshes.append((name, spec.mesh))
                units.setdefault(owner, Unit(owner, [], {})).names.append(name)
                units[owner].specs[name] = spec
            else:  # ignored by FSDP (or outside every unit): the same full tensor on every rank
                owner = None
                replicated.append(name)
            self.owner_of[name] = owner
        if not meshes:
            raise ShardingError("no parameter of this model is sharded: nothing for fully_shard to do")
        first, mesh = meshes[0]
        for name, other in meshes[1:]:
            if other is not mesh and other != mesh:
                raise ShardingError(f"parameters {first} and {name} are sharded over different meshes: the engine "
                                    "reduces every statistic over one group; shard every unit over the same 1-D mesh")
        self.mesh = mesh
        self.group = mesh.get_group()
        _check_group(self.group, process_group)
        self.units = list(units.values()) + ([Unit("", replicated)] if replicated else [])
        self.forward_params: dict[str, Tensor] = {}  # name -> the tensor the latest forward registered
        self._handles = [m.register_forward_pre_hook(self._record_forward_params(path)) for path, m in
                         self.modules.items()]

    def _record_forward_params(self, unit: str):
        names = [n for n, owner in self.owner_of.items() if owner == unit]

        def hook(module: nn.Module, args) -> None:  # after FSDP's own pre-hook: the unit is all-gathered
            rel = len(unit) + 1 if unit else 0
            for name in names:
                self.forward_params[name] = module.get_parameter(name[rel:])
        return hook

    def graph_param(self, name: str, param: Tensor) -> Tensor:
        """The tensor autograd's graph holds for parameter `name`: the unsharded one the latest
        forward used (the parameter itself when it is not sharded)."""
        return self.forward_params.get(name, param) if isinstance(param, DTensor) else param

    def like_param(self, name: str, param: Tensor, value: Tensor) -> Tensor:
        """`value` laid out as the parameter: a full-size tensor for a sharded parameter becomes a
        DTensor around this rank's part; anything else is returned as it is."""
        if isinstance(param, DTensor) and not isinstance(value, DTensor):
            if value.shape != param.shape:
                raise ValueError(f"set_grad: {name} has shape {tuple(param.shape)}, got {tuple(value.shape)}")
            spec = self.specs[name]
            return spec.dtensor(spec.part(value.detach()))
        return value

    @contextlib.contextmanager
    def gathered(self, names):
        """The units holding the parameters `names` all-gathered for the block (their modules see
        the unsharded tensors), resharded after; units that were unsharded already stay so."""
        opened = []
        for path in dict.fromkeys(self.owner_of.get(n) for n in names):
            module = self.modules.get(path) if path is not None else None
            if module is not None and any(isinstance(module.get_parameter(n[len(path) + 1 if path else 0:]), DTensor)
                                          for n in names if self.owner_of.get(n) == path):
                module.unshard()
                opened.append(module)
        try:
            yield
        finally:
            for module in opened:
                module.reshard()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.forward_params.clear()


@contextlib.contextmanager
def unsharded_after_backward(model: nn.Module):
    """Backwards inside the block leave every fully_shard unit of `model` unsharded (the ones they
    all-gather stay so); on leaving, the units reshard after backwards again, so the NEXT backward
    (e.g. total.backward() of a loss built from gradients with create_graph=True, whose second
    backward reads the parameters the first one used) frees them once it is done with them.
    FSDP2 otherwise frees a unit's unsharded parameters after every backward. No-op for a model
    without fully_shard units."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_reshard_after_backward(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.set_reshard_after_backward(True, recurse=False)


def refuse_late_sharding(model: nn.Module) -> None:
    """For an engine created without a Sharding: refuse a model sharded since (its hooks and
    parameters are those fully_shard replaced)."""
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ShardingError("the model was sharded (fully_shard) after this engine was created, so the engine holds "
                            "the parameters FSDP replaced: create ga.PerSampleGradients(model) after fully_shard")


def sharding_of(model: nn.Module, process_group: Any = None) -> Sharding | None:
    """The model's Sharding when a fully_shard module or a DTensor parameter is in it, else None
    (a plain or DistributedDataParallel model)."""
    if not any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules()) \
            and not any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    return Sharding(model, process_group)

"""What each of 2 gloo ranks runs in tests/engine/test_fsdp.py (models sharded with FSDP2's
fully_shard), and the single-process references on the concatenated batch.

The global batch of 13 is split unevenly (7 and 6), so a per-rank normaliser or count would
show. Every scenario trains two steps with Adam (eps 1e-4: the attention's key biases have a
true gradient of 0, softmax being shift-invariant, so with a tiny eps Adam's update there would
be the sign of rounding noise), and gathers p.grad and the parameters from their shards.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import gradalign as ga
from tests.support.gloo import end_process_group  # (imports torch.distributed.nn before init: gloo.py)
from tests.support.sharded_models import B, HeadNet, batch, build, full, losses, shard_head_net

WEIGHTINGS = {"plain": lambda: None, "gasw": lambda: ga.GASW(gamma=2.0),
              "gdsw_loo": lambda: ga.GDSW(gamma=1.5, leave_one_out=True)}

# name -> (model kind, weighting, build options, release): what both sides run
ENGINE = {
    "transformer/plain": ("transformer", "plain", {}, False),
    "transformer/gasw": ("transformer", "gasw", {}, True),
    "transformer/gdsw_loo": ("transformer", "gdsw_loo", {"verify": True}, False),
    "transformer/gasw-no-reshard": ("transformer", "gasw", {"reshard": False}, True),
    "transformer/gasw-checkpoint-wrapper": ("transformer", "gasw", {"checkpoint": "wrapper"}, True),
    "transformer/gasw-mp": ("transformer", "gasw", {"mp": True}, True),
    "transformer/gasw-mp-checkpoint": ("transformer", "gasw", {"mp": True, "checkpoint": "function"}, False),
    "gpt2/gasw": ("gpt2", "gasw", {}, True),
    "gpt2/gasw-mp-checkpoint": ("gpt2", "gasw", {"mp": True, "checkpoint": "hf"}, True),
}


def shard(t, rank, world):
    return torch.tensor_split(t, world)[rank]


def train(model, kind: str, x, y, weighting: str, *, release: bool, steps: int = 2, verify: bool = False) -> dict:
    """Steps of engine.backward + Adam; per step the statistics and p.grad, then the parameters."""
    engine = ga.PerSampleGradients(model, verify=verify)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-4)
    out = []
    for _ in range(steps):
        stats = engine.backward(losses(kind, model, x, y), weights=WEIGHTINGS[weighting](), release=release)
        record = dict(norms=stats.norms, weights=stats.weights)
        if not release:  # every statistic, read after the step
            record.update(cosines=stats.cosines, mean_sq=stats.mean_grad_sq_norm, dots=stats.dots_with_mean,
                          grad_sq_sum={plain(n): full(t) for n, t in stats.grad_sq_sum.items()},
                          mean_grad={plain(n): full(t) for n, t in stats.mean_grad.items()})
        record["grad"] = {plain(n): full(p.grad).clone() for n, p in model.named_parameters()}
        record["layout"] = {plain(n): (_layout(p), _layout(p.grad)) for n, p in model.named_parameters()}
        out.append(record)
        opt.step()
        opt.zero_grad(set_to_none=True)
    engine.remove()
    return dict(steps=out, params={plain(n): full(p).detach().clone() for n, p in model.named_parameters()})


def plain(name: str) -> str:
    """A parameter's name without checkpoint_wrapper's module in it (as in the model without it)."""
    return name.replace("_checkpoint_wrapped_module.", "")


def _layout(t) -> tuple:
    """(type, placements, dtype, shape of this rank's part)."""
    return (type(t).__name__, tuple(repr(p) for p in getattr(t, "placements", ())), t.dtype,
            tuple(t.to_local().shape) if hasattr(t, "to_local") else tuple(t.shape))


def train_mixed_reference(kind: str, x, y, weighting: str, steps: int = 2) -> dict:
    """One process doing what FSDP's mixed precision does: the forward and the per-sample
    gradients in bfloat16 parameters, p.grad in float32 on float32 master weights."""
    master = build(kind)
    compute = build(kind).to(torch.bfloat16)
    engine = ga.PerSampleGradients(compute)
    opt = torch.optim.Adam(master.parameters(), lr=1e-2, eps=1e-4)
    out = []
    for _ in range(steps):
        compute.load_state_dict({n: p.to(torch.bfloat16) for n, p in master.state_dict().items()})
        stats = engine.backward(losses(kind, compute, x, y), weights=WEIGHTINGS[weighting](), write_grad=False)
        update = stats.weighted_sum(stats.weights, factor=1.0 / stats.batch_size)  # float32
        for n, p in master.named_parameters():
            p.grad = update[n].float()
        out.append(dict(norms=stats.norms, weights=stats.weights, cosines=stats.cosines,
                        grad={n: p.grad.clone() for n, p in master.named_parameters()}))
        opt.step()
        opt.zero_grad(set_to_none=True)
    engine.remove()
    return dict(steps=out, params={n: p.detach().clone() for n, p in master.named_parameters()})


def engine_run(name: str, rank: int = 0, world: int = 1) -> dict:
    kind, weighting, options, release = ENGINE[name]
    options = dict(options)
    verify = options.pop("verify", False)  # the engine's own check against autograd, every step
    x, y = batch(kind)
    model = build(kind, shard=world > 1, **options)
    return train(model, kind, shard(x, rank, world), shard(y, rank, world), weighting, release=release, verify=verify)


def engine_reference(name: str) -> dict:
    kind, weighting, options, release = ENGINE[name]
    x, y = batch(kind)
    if options.get("mp"):
        return train_mixed_reference(kind, x, y, weighting)
    return train(build(kind), kind, x, y, weighting, release=release)


# ---------------------------------------------------------------- the methods

def gaga_run(sharded: bool, rank: int = 0, world: int = 1) -> dict:
    """Six increments of 8 (4 + 4 under two ranks), steps taken with the accumulated mean."""
    model = build(shard=sharded)
    engine = ga.PerSampleGradients(model)
    acc = ga.GSNRAccumulator(tau=3.0, increment=8, max_samples=24)
    means = []
    for k in range(6):
        x, y = batch(n=8, seed=10 + k)
        stats = engine.backward(losses("transformer", model, shard(x, rank, world), shard(y, rank, world)),
                                write_grad=False)
        if acc.update(stats):
            engine.set_grad(acc.mean_grad())
            means.append({n: full(p.grad).clone() for n, p in model.named_parameters()})
            model.zero_grad(set_to_none=True)
    engine.remove()
    return dict(samples=acc.samples_per_step, snr=acc.snr_per_step, means=means)


def head_batch(k: int):
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(B, 12, generator=g), torch.randint(0, 5, (B,), generator=g)


def gwa_run(sharded: bool, rank: int = 0, world: int = 1) -> dict:
    """Two epochs of three batches (engine mean gradient, SGD) with a GWA monitor on the head,
    sharded in its own unit (its process group taken from the head's mesh)."""
    model = shard_head_net(HeadNet()) if sharded else HeadNet()
    monitor = ga.GWAMonitor(model.head)
    engine = ga.PerSampleGradients(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        for k in range(3):
            x, y = head_batch(k)
            ids = torch.arange(k * B, (k + 1) * B)
            x, y, ids = (shard(t, rank, world) for t in (x, y, ids))
            logits = model(x)
            monitor.update(logits.detach(), y, ids)
            engine.backward(F.cross_entropy(logits, y, reduction="none"))
            opt.step()
            opt.zero_grad(set_to_none=True)
        monitor.end_epoch()
    monitor.remove()
    engine.remove()
    return dict(epoch_scores=monitor.epoch_scores, mean=monitor.epoch_mean_alignment,
                sample_scores=monitor.sample_scores())


def gvr_run(mode: str, sharded: bool, rank: int = 0, world: int = 1) -> dict:
    """GVR's total on this rank's part of two views; p.grad after total.backward() (FSDP
    averages over ranks, as DDP does)."""
    model = shard_head_net(HeadNet()) if sharded else HeadNet()
    g = torch.Generator().manual_seed(7)
    x1, x2, y = torch.randn(B, 12, generator=g), torch.randn(B, 12, generator=g), torch.randint(0, 5, (B,), generator=g)
    layers = model.head if mode == "closed_form" else [model.body[1][0], model.head]
    total, _ = ga.GVR(alpha=0.5, layers=layers, subset=32, mode=mode).loss(
        model, *(shard(t, rank, world) for t in (x1, x2, y)))
    total.backward()
    return {n: full(p.grad).clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------- refusals

def refusals(rank: int, world: int) -> dict:
    """The message of each model the engine refuses (only rank 0 records them)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    out = {}
    alone = dist.new_group([0])  # every rank creates it; only rank 0 is in it
    model = HeadNet()  # tensor parallel: a DTensor parameter no fully_shard owns
    mesh = init_device_mesh("cpu", (world,))
    model.head.weight = torch.nn.Parameter(distribute_tensor(model.head.weight.detach(), mesh, [Shard(0)]))
    out["tensor_parallel"] = _message(lambda: ga.PerSampleGradients(model))
    hsdp = HeadNet()  # a 2-D mesh: replicate x shard
    fully_shard(hsdp, mesh=init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard")))
    out["hsdp"] = _message(lambda: ga.PerSampleGradients(hsdp))
    sharded = shard_head_net(HeadNet())
    if rank == 0:
        out["other_group"] = _message(lambda: ga.PerSampleGradients(sharded, process_group=alone))
    late = HeadNet()  # an engine created before fully_shard
    engine = ga.PerSampleGradients(late)
    shard_head_net(late)
    x, y = head_batch(0)
    out["late"] = _message(lambda: engine.backward(F.cross_entropy(late(shard(x, rank, world)), shard(y, rank, world),
                                                                   reduction="none")))
    return out


def _message(make) -> str | None:
    try:
        make()
    except ga.GradAlignError as e:
        return f"{type(e).__name__}: {e}"
    return None


# ---------------------------------------------------------------- one rank

def has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def run_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    scenarios = {name: (lambda name=name: engine_run(name, rank, world)) for name in ENGINE
                 if not name.startswith("gpt2") or has_transformers()}
    scenarios.update({"gaga": lambda: gaga_run(True, rank, world), "gwa": lambda: gwa_run(True, rank, world),
                      "gvr/closed_form": lambda: gvr_run("closed_form", True, rank, world),
                      "gvr/autograd": lambda: gvr_run("autograd", True, rank, world),
                      "refusals": lambda: refusals(rank, world)})
    try:  # an exception ends this process; torch.multiprocessing.spawn then ends the other one
        for name, scenario in scenarios.items():
            results[name] = scenario()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        dist.destroy_process_group()  # the failure's frames may hold the group: no thread check
        raise
    end_process_group(f"rank {rank}", check=False)  # garbage collected first (gloo.py)

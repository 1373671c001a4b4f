"""What each of 2 gloo ranks runs in test_distributed.py, and the single-process references.

Every scenario uses a global batch that the ranks split contiguously and UNEVENLY (rank 0
holds more samples than rank 1), so a normaliser or count taken per rank would show.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import gradalign as ga
from tests.support.engine_models import Conv1dNet, cross_entropy
from tests.support.gloo import end_process_group

B = 13                                          # global batch; shards of 7 and 6


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 48), nn.ReLU(), nn.Linear(48, 10))


class HeadNet(nn.Module):
    """A body and an nn.Linear head, for GWA and GVR."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(40, 16), nn.Tanh())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.body(x))


MODELS = {"mlp": mlp, "conv1d": lambda: (torch.manual_seed(0), Conv1dNet())[1]}


def batch(seed=1, n=B, classes=10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 40, generator=g), torch.randint(0, classes, (n,), generator=g)


def shard(t, rank, world):
    return torch.tensor_split(t, world)[rank]


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- the engine (GASW, GDSW, plain)

LOSS_SCALES = (1.0, 1e20, 1e-30)  # x1e20 and x1e-30: the engine divides by its loss scale (squares overflow)


def engine_step(model, x, y, weights, group=None, loss_scale=1.0):
    """Every statistic of one backward of the losses times `loss_scale`, in float64 divided by
    loss_scale (squares by its square), so that the comparisons are relative at every scale:
    the weights and cosines, the per-sample sums |g_i|^2, <g_i, S>, |S|^2 (from scaled_sums(),
    which stay in range where the squares themselves overflow or underflow float32), S, gbar,
    sum_i g_i**2 (at scale 1: elsewhere it does not fit float32), |gbar| and p.grad."""
    engine = ga.PerSampleGradients(model, process_group=group)
    stats = engine.backward(cross_entropy(model(x), y) * loss_scale, weights=weights)
    engine.remove()
    s = float(stats.scale) / loss_scale  # the statistics' own scale, over the loss scale

    def per_scale(t, power=1):
        return t.double() / loss_scale ** power

    sq_norms, dots, sum_sq = (t.double() * s * s for t in stats.scaled_sums())
    out = dict(norms=per_scale(stats.norms), cosines=stats.cosines.double(), weights=stats.weights.double(),
               sq_norms=sq_norms, dots_with_sum=dots, sum_sq_norm=sum_sq,
               mean_grad_norm=per_scale(stats.mean_grad_norm), global_batch_size=stats.global_batch_size,
               grad_sum={n: per_scale(g) for n, g in stats.grad_sum.items()},
               mean_grad={n: per_scale(g) for n, g in stats.mean_grad.items()},
               grad={n: per_scale(g) for n, g in grads(model).items()})
    if loss_scale == 1.0:
        out["grad_sq_sum"] = {n: per_scale(g, 2) for n, g in stats.grad_sq_sum.items()}
        out["dots_with_mean"], out["mean_grad_sq_norm"] = stats.dots_with_mean.double(), stats.mean_grad_sq_norm.double()
    model.zero_grad(set_to_none=True)
    return out


def weighting(kind):
    return {"plain": None, "gasw": ga.GASW(gamma=2.0), "gdsw_loo": ga.GDSW(gamma=1.5, leave_one_out=True)}[kind]


def gaga_run(model, group=None, rank=0, world=1):
    """Three accumulations fed global increments of 8 (4 + 4 under two ranks)."""
    engine = ga.PerSampleGradients(model, process_group=group)
    acc = ga.GSNRAccumulator(tau=3.0, increment=8, max_samples=24)
    means = []
    for k in range(6):
        x, y = batch(seed=10 + k, n=8)
        stats = engine.backward(cross_entropy(model(shard(x, rank, world)), shard(y, rank, world)),
                                write_grad=False)
        if acc.update(stats):
            engine.set_grad(acc.mean_grad())
            means.append(grads(model))
            model.zero_grad(set_to_none=True)
    engine.remove()
    return dict(samples=acc.samples_per_step, snr=acc.snr_per_step, means=means)


def gwa_run(model, group=None, rank=0, world=1):
    """Two epochs of three batches (SGD steps), scores gathered at each end_epoch."""
    monitor = ga.GWAMonitor(model.head, process_group=group)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for epoch in range(2):
        for k in range(3):
            x, y = batch(seed=100 + k, n=B, classes=5)
            ids = torch.arange(k * B, (k + 1) * B)
            x, y, ids = (shard(t, rank, world) for t in (x, y, ids))
            logits = model(x)
            # the global mean loss: each rank's sum over the global B, gradients summed by hand
            (F.cross_entropy(logits, y, reduction="sum") / B).backward()
            if group is not None:
                for p in model.parameters():
                    dist.all_reduce(p.grad, group=group)
            monitor.update(logits.detach(), y, ids)
            opt.step()
            opt.zero_grad()
        monitor.end_epoch()
    monitor.remove()
    return dict(epoch_scores=monitor.epoch_scores, mean=monitor.epoch_mean_alignment,
                sample_scores=monitor.sample_scores(), best=monitor.best_epoch())


def gvr_loss_backward(model, inner, x1, x2, y, mode):
    """GVR's total on (x1, x2, y), backward; `inner` is the unwrapped model (the layers)."""
    layers = inner.head if mode == "closed_form" else [inner.body[0], inner.head]
    total, _ = ga.GVR(alpha=0.5, layers=layers, subset=32, mode=mode).loss(model, x1, x2, y)
    total.backward()


def gvr_views(seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 40, generator=g), torch.randn(B, 40, generator=g), torch.randint(0, 5, (B,), generator=g)


# ---------------------------------------------------------------- one rank

def scenarios(rank: int, world: int, group) -> dict:
    """Every scenario on this rank's shards. Everything that holds the group (DDP models, engines,
    statistics, monitors) is local here, so it is garbage once this returns."""
    results = {}
    x, y = batch()
    xs, ys = shard(x, rank, world), shard(y, rank, world)
    for name, build in MODELS.items():
        for kind in ("plain", "gasw", "gdsw_loo"):
            for scale in LOSS_SCALES:
                results[f"{name}/{kind}/{scale:g}"] = engine_step(build(), xs, ys, weighting(kind), group, scale)
    for kind in ("plain", "gasw"):  # an empty rank (Poisson sampling): rank 0 holds every sample
        mine = slice(None) if rank == 0 else slice(0, 0)
        results[f"empty/{kind}"] = engine_step(mlp(), x[mine], y[mine], weighting(kind), group)
    # a DDP-wrapped model: the engine takes DDP's group and reduces once; two optimizer steps
    ddp = nn.parallel.DistributedDataParallel(mlp())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    engine = ga.PerSampleGradients(ddp)
    gasw = ga.GASW(gamma=2.0)
    steps = []
    for _ in range(2):
        engine.backward(cross_entropy(ddp(xs), ys), weights=gasw, release=True)  # as the experiments
        steps.append({n.removeprefix("module."): g for n, g in grads(ddp).items()})
        opt.step()
        opt.zero_grad(set_to_none=True)
    engine.remove()
    results["ddp/gasw"] = steps
    results["gaga"] = gaga_run(mlp(), group, rank, world)
    results["gwa"] = gwa_run(HeadNet(), group, rank, world)
    x1, x2, yv = gvr_views()
    for mode in ("closed_form", "autograd"):   # each rank's penalty on its shard; DDP averages
        ddp = nn.parallel.DistributedDataParallel(HeadNet())
        gvr_loss_backward(ddp, ddp.module, *(shard(t, rank, world) for t in (x1, x2, yv)), mode)
        results[f"gvr/{mode}"] = {n.removeprefix("module."): g for n, g in grads(ddp).items()}
    return results


def run_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """The scenarios on one rank, then a teardown that really ends the gloo group (gloo.py: a
    group alive at the interpreter's exit aborts the process now and then)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(scenarios(rank, world, dist.group.WORLD), os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        dist.destroy_process_group()  # the failure's frames may hold the group: no thread check
        raise
    end_process_group(f"rank {rank}")

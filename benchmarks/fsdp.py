"""The engine on a model sharded with FSDP2 against a plain FSDP step, per rank: peak extra
memory and the bytes each step's collectives move.

    python -m benchmarks.fsdp                            # gpt2 (needs transformers) and vit_linear, 2 ranks
    python -m benchmarks.fsdp --models vit_linear wide_mlp --world 2 --threads 1

Each of `--world` gloo processes on this CPU holds B / world samples of the model's benchmark
batch (benchmarks/models.py) and the model sharded by fully_shard: every block (GPT-2's
transformer.h, the ViT's blocks; each Linear of the MLP) a unit, then the root. Variants, each
on a fresh sharded copy (same weights, same batch):
  plain FSDP   forward, mean cross-entropy of the rank's samples, loss.backward() (FSDP's own
               reduce-scatter: the mean over ranks)
  mean         engine.backward(losses, release=True): p.grad the global mean, from the factors
  clip         engine.backward(losses, weights=min(1, C/|g_i|), release=True)
  gasw         engine.backward(losses, weights=GASW(2), release=True)
Memory: the extra peak memory of one step above what is held once the previous gradients are
freed (benchmarks/timing.py peak_memory_mb: the tensor storages the step's operators create and
hold at once, plus FSDP's unsharded parameters, whose storages FSDP resizes in place), per rank.
Communication: every torch.distributed collective of one step, by kind, with the size of the
tensor it reduces or gathers (all-reduce: the tensor; reduce-scatter: its input, all ranks'
parts; all-gather: its output), and the bytes a rank sends with ring algorithms ((R-1)/R of a
reduce-scatter's or all-gather's size, 2(R-1)/R of an all-reduce's).
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gradalign as ga
from benchmarks.models import BATCHES, build_model, build_shape, clip_weights, per_sample_losses
from benchmarks.timing import peak_memory_mb, print_table

VARIANTS = ("plain FSDP", "mean", "clip", "gasw")
# function -> (kind, position of the tensor whose size is counted: all-reduce's tensor, a
# reduce-scatter's input, an all-gather's output)
_COLLECTIVES = {"all_reduce": ("all-reduce", 0), "reduce_scatter_single": ("reduce-scatter", 1),
                "reduce_scatter_tensor": ("reduce-scatter", 1), "all_gather_single": ("all-gather", 0),
                "all_gather_into_tensor": ("all-gather", 0), "broadcast": ("broadcast", 0)}


def units(kind: str, model: torch.nn.Module) -> list[torch.nn.Module]:
    if kind == "gpt2":
        return list(model.lm.transformer.h)
    if kind == "wide_mlp":
        return [m for m in model if isinstance(m, torch.nn.Linear)]
    return list(model.blocks)


def sharded(kind: str):
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model, shape = build_model(kind), build_shape(kind)
    for unit in units(kind, model):
        fully_shard(unit)
    fully_shard(model)
    return model, shape


def batch(kind: str, shape, B: int, rank: int, world: int):
    g = torch.Generator().manual_seed(1)
    if kind == "gpt2":
        x = torch.randint(0, 1000, (B, *shape), generator=g)
        y = x
    else:
        x, y = torch.randn(B, *shape, generator=g), torch.randint(0, 10, (B,), generator=g)
    return torch.tensor_split(x, world)[rank], torch.tensor_split(y, world)[rank]


def step_of(variant: str, kind: str, model, x, y):
    engine = None if variant == "plain FSDP" else ga.PerSampleGradients(model)
    weights = {"mean": None, "clip": clip_weights, "gasw": ga.GASW(2.0)}.get(variant)

    def step():
        model.zero_grad(set_to_none=True)
        losses = per_sample_losses(kind, model(x), y)
        if engine is None:
            losses.mean().backward()
        else:
            engine.backward(losses, weights=weights, release=True)
    return step


def unsharded_bytes(model) -> int:
    """Bytes of FSDP's unsharded parameters allocated now (their storages are resized in place)."""
    total = 0
    for m in model.modules():
        if hasattr(m, "_get_fsdp_state"):
            for group in m._get_fsdp_state()._fsdp_param_groups:
                for p in group.fsdp_params:
                    total += sum(t.untyped_storage().nbytes() for t in p.all_gather_outputs)
    return total


class Counted:
    """Counts the collectives issued while active: {kind: [calls, bytes of the tensor]}."""

    def __init__(self):
        self.counts = collections.defaultdict(lambda: [0, 0])
        self._saved = {}

    def __enter__(self):
        for name, (kind, position) in _COLLECTIVES.items():
            if hasattr(dist, name):
                self._saved[name] = original = getattr(dist, name)
                setattr(dist, name, self._wrap(original, kind, position))
        return self

    def _wrap(self, original, kind, position):
        @functools.wraps(original)
        def counted(*args, **kwargs):
            t = args[position] if len(args) > position else next(
                kwargs[k] for k in (("input", "input_tensor") if position else ("tensor", "output_tensor", "output"))
                if k in kwargs)
            self.counts[kind][0] += 1
            self.counts[kind][1] += t.numel() * t.element_size()
            return original(*args, **kwargs)
        return counted

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)


def run_rank(rank: int, world: int, init: str, out: str, models: list[str], threads: int) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    results = {}
    try:
        for kind in models:
            B = BATCHES[kind][-1] if kind != "wide_mlp" else 256
            for variant in VARIANTS:
                model, shape = sharded(kind)
                x, y = batch(kind, shape, B, rank, world)
                step = step_of(variant, kind, model, x, y)
                mb = peak_memory_mb(step, torch.device("cpu"), lambda m=model: m.zero_grad(set_to_none=True),
                                    extra=lambda m=model: unsharded_bytes(m))
                with Counted() as counted:
                    step()
                results[f"{kind}/{variant}"] = dict(memory=mb, comm={k: list(v) for k, v in counted.counts.items()},
                                                    B=x.shape[0])
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    models = args.models or (["gpt2"] if _has_transformers() else []) + ["vit_linear"]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(run_rank, args=(args.world, os.path.join(tmp, "init"), tmp, models, args.threads),
                 nprocs=args.world, join=True)
        ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(args.world)]
    R = args.world
    rows = []
    for kind in models:
        plain = ranks[0][f"{kind}/plain FSDP"]
        for variant in VARIANTS:
            cells = [r[f"{kind}/{variant}"] for r in ranks]
            comm = cells[0]["comm"]
            sent = sum(size * (2 if k == "all-reduce" else 1) * (R - 1) / R for k, (_, size) in comm.items())
            plain_sent = sum(size * (2 if k == "all-reduce" else 1) * (R - 1) / R
                             for k, (_, size) in plain["comm"].items())
            rows.append({"model": kind, "B per rank": "/".join(str(c["B"]) for c in cells), "variant": variant,
                         "peak MB per rank": "/".join(f"{c['memory']:.2f}" for c in cells),
                         "memory vs plain": "/".join(f"{c['memory'] / p['memory']:.2f}x"
                                                     for c, p in zip(cells, [r[f"{kind}/plain FSDP"] for r in ranks])),
                         "collectives (calls, MB)": ", ".join(f"{k} {n} x, {size / 2**20:.2f}"
                                                              for k, (n, size) in sorted(comm.items())),
                         "sent per rank MB": sent / 2**20, "sent vs plain": f"{sent / plain_sent:.2f}x"})
    print_table(rows, ["model", "B per rank", "variant", "peak MB per rank", "memory vs plain",
                       "collectives (calls, MB)", "sent per rank MB", "sent vs plain"])


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()

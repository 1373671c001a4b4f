"""Engine cost against a plain forward+backward of the mean loss, and against materialising routes.

    python benchmarks/engine.py                 # full table (several minutes on 2 CPU cores)
    python benchmarks/engine.py --quick         # fewer rounds, no memory column
    python benchmarks/engine.py --models resnet_gn   # one model (its default batch sizes)

Variants, each on its own copy of the model (same weights, same batch):
  plain        forward, mean cross-entropy, backward
  norms        engine.backward(losses); stats.norms
  gasw         engine.backward(losses, weights=GASW(2)): norms, cosines, weighted p.grad
  gaga         engine.backward(losses); stats.grad_sq_sum
  vmap gasw    torch.func vmap(grad) per-sample gradients, then the GASW statistics and p.grad
  opacus gasw  Opacus GradSampleModule grad_sample, then the same (when opacus is installed)
  backpack gasw BackPACK BatchGrad, then the same (when backpack is installed)
Memory: extra peak memory of one step in a fresh process (CPU: peak RSS growth; CUDA:
max_memory_allocated), as a ratio to the plain step.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
from pathlib import Path

import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from timing import memory_in_subprocess, peak_memory_mb, print_table, time_variants  # noqa: E402

import gradalign as ga  # noqa: E402
from gradalign.experiments.models import build_model  # noqa: E402

MODELS = {"mlp": "seed MLP 40-256-256-10", "conv1d": "Conv1d net (experiments.models)",
          "resnet_gn": "ResNet with GroupNorm: 3 stages of one basic block, 16-32-64 channels, 32x32 RGB"}
BATCHES = {"mlp": (32, 128, 512), "conv1d": (32, 128, 512), "resnet_gn": (32,)}
INPUT_SHAPES = {"mlp": (40,), "conv1d": (40,), "resnet_gn": (3, 32, 32)}


class BasicBlock(nn.Module):
    """conv3x3-GN-ReLU-conv3x3-GN plus the shortcut (1x1 conv + GN where the shape changes), ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(8, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(8, c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.GroupNorm(8, c_out))

    def forward(self, x):
        h = F.relu(self.gn1(self.conv1(x)))
        return F.relu(self.gn2(self.conv2(h)) + self.shortcut(x))


class ResNetGN(nn.Module):
    """A small CIFAR-style ResNet with GroupNorm (what ga.replace_batchnorm makes of a BatchNorm one)."""

    def __init__(self, classes: int = 10, widths=(16, 32, 64)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.GroupNorm(8, widths[0]),
                                  nn.ReLU())
        blocks, c_in = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(c_in, width, stride=1 if i == 0 else 2))
            c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, classes)

    def forward(self, x):  # (B, 3, 32, 32)
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def build(kind: str) -> nn.Module:
    return ResNetGN() if kind == "resnet_gn" else build_model(kind)


def gasw_from_materialised(grads: dict, params: dict, gamma: float = 2.0) -> None:
    """GASW statistics and p.grad from materialised per-sample gradients {name: (B, ...)}."""
    B = next(iter(grads.values())).shape[0]
    mean = {n: g.mean(0) for n, g in grads.items()}
    sq_norms = sum(g.flatten(1).square().sum(1) for g in grads.values())
    dots = sum(g.flatten(1) @ mean[n].flatten() for n, g in grads.items())
    cos = dots / (sq_norms.sqrt() * sum(m.square().sum() for m in mean.values()).sqrt())
    raw = cos.clamp_min(0).pow(gamma)
    w = raw * B / raw.sum()
    for n, p in params.items():
        p.grad = torch.tensordot(w, grads[n], dims=1) / B


def make_variants(kind: str, B: int, device: torch.device, only: str | None = None) -> dict:
    """The variants' step functions; `only` builds just that one (for memory measurement)."""
    torch.manual_seed(0)
    base = build(kind).to(device)
    x = torch.randn(B, *INPUT_SHAPES[kind], device=device)
    y = torch.randint(0, 10, (B,), device=device)
    variants = {}

    plain = copy.deepcopy(base)

    def plain_step():
        plain.zero_grad(set_to_none=True)
        F.cross_entropy(plain(x), y).backward()
    variants["plain"] = plain_step

    def engine_step(statistic):
        model = copy.deepcopy(base)
        engine = ga.PerSampleGradients(model)

        def step():
            model.zero_grad(set_to_none=True)
            losses = F.cross_entropy(model(x), y, reduction="none")
            statistic(engine, losses)
        return step

    variants["norms"] = engine_step(lambda e, l: e.backward(l).norms)
    variants["gasw"] = engine_step(lambda e, l: e.backward(l, weights=ga.GASW(2.0)))
    variants["gaga"] = engine_step(lambda e, l: e.backward(l).grad_sq_sum)

    vmap_model = copy.deepcopy(base)
    vmap_params = dict(vmap_model.named_parameters())
    loss = lambda out, t: F.cross_entropy(out, t, reduction="none")  # noqa: E731
    variants["vmap gasw"] = lambda: gasw_from_materialised(
        ga.per_sample_gradients(vmap_model, x, y, loss), vmap_params)

    if importlib.util.find_spec("opacus"):
        from opacus import GradSampleModule
        op_model = GradSampleModule(copy.deepcopy(base), loss_reduction="sum")
        op_params = {n: p for n, p in op_model.named_parameters()}

        def opacus_step():
            op_model.zero_grad(set_to_none=True)
            F.cross_entropy(op_model(x), y, reduction="sum").backward()
            gasw_from_materialised({n: p.grad_sample for n, p in op_params.items()}, op_params)
            for p in op_params.values():
                p.grad_sample = None
        variants["opacus gasw"] = opacus_step

    if importlib.util.find_spec("backpack"):
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad
        bp_model = extend(copy.deepcopy(base), use_converter=True)
        bp_loss = extend(torch.nn.CrossEntropyLoss(reduction="sum"))
        bp_params = dict(bp_model.named_parameters())

        def backpack_step():
            bp_model.zero_grad(set_to_none=True)
            with backpack(BatchGrad()):
                bp_loss(bp_model(x), y).backward()
            gasw_from_materialised({n: p.grad_batch for n, p in bp_params.items()}, bp_params)
        variants["backpack gasw"] = backpack_step
    if only is not None:
        return {only: variants[only]}
    for name in ("opacus gasw", "backpack gasw"):  # optional libraries may not support the model
        try:
            variants.get(name, lambda: None)()
        except Exception as err:  # noqa: BLE001 - report and leave the variant out
            print(f"  {name} left out for {kind}: {type(err).__name__}: {err}", file=sys.stderr)
            variants.pop(name)
    return variants


def measure_memory(kind: str, B: int, name: str, device: torch.device) -> float:
    """Peak extra memory of one variant's steps, in a process that ran nothing else.

    Two steps on a batch of 2 first, so that one-time initialisation (lazy imports, caches)
    is not counted; their own peak is negligible.
    """
    warm = make_variants(kind, 2, device, only=name)[name]
    warm(), warm()
    step = make_variants(kind, B, device, only=name)[name]
    return peak_memory_mb(step, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 rounds, no memory measurement")
    parser.add_argument("--rounds", type=int, default=21, help="timing rounds per variant (median over rounds)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes for every model "
                        "(default: 32, 128, 512; the ResNet 32)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--measure-memory", nargs=3, metavar=("MODEL", "B", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="backpack|opacus|torch")
    device = torch.device(args.device)
    if args.measure_memory:
        kind, B, name = args.measure_memory
        print(json.dumps(measure_memory(kind, int(B), name, device)))
        return
    rounds = 5 if args.quick else args.rounds
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"{rounds} rounds; median ms per step and ratio to plain\n")
    rows = []
    for kind in args.models:
        for B in args.batches or BATCHES[kind]:
            variants = make_variants(kind, B, device)
            medians = time_variants(variants, rounds=rounds)
            memory = {}
            if not args.quick:
                memory = {name: memory_in_subprocess(__file__, [kind, str(B), name, "--device", args.device])
                          for name in variants}
            for name, seconds in medians.items():
                row = {"model": kind, "B": B, "variant": name, "ms": seconds * 1e3,
                       "x plain": seconds / medians["plain"]}
                if memory:
                    row["peak MB"] = memory[name]
                    row["mem x plain"] = memory[name] / max(memory["plain"], 1e-3)
                rows.append(row)
            print(f"  done {kind} B={B}", file=sys.stderr)
    columns = ["model", "B", "variant", "ms", "x plain"] + ([] if args.quick else ["peak MB", "mem x plain"])
    print_table(rows, columns)


if __name__ == "__main__":
    main()

"""Training throughput of the CIFAR experiments' steps: images per second, and the ratio to SGD.

    python -m benchmarks.vision                       # CPU, all models, small number of rounds
    python -m benchmarks.vision --device cuda --rounds 21
    python -m benchmarks.vision --models resnet18 --batch 128

Each variant is the training loop's own step (experiments/steps.py: the pipeline's views on
the device, the forward under the run's autocast, the GWA monitor's update, the method's
backward and the optimizer step), on its own copy of the same model, with random uint8 images
kept on the device as a run keeps CIFAR. Timed interleaved over rounds (timing.py); on a GPU
every step ends with a synchronize. Images per second count training images (a two-view step
on B images counts B). "eval" is the per-epoch evaluation: a forward of the model in eval mode
under the same autocast, per image.

    resnet18   SGD (one view, augmented)              gvr-cifar100's "sgd" arm
               two views, plain                        CE(view 1) + CE(view 2) (the head penalty, recorded
                                                        from the logits, costs next to nothing)
               two views, alpha = 0 (control)          its "two_view" arm: separate subset forwards,
                                                        penalty computed for the record, no double backprop
               GVR faithful                            its "gvr" arm: separate subset forwards, autograd
                                                        over the last stage + fc, double backprop
               GVR closed form                         head only, from the full-batch logits (shared)
    vit, convnext  Adam with and without the GWA monitor (gwa-cifar10's arms have it on)
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch

from benchmarks.timing import print_table, time_variants

import gradalign as ga
from gradalign.experiments.arms import METHODS
from gradalign.experiments.augment import NORMALIZATION, ImagePipeline
from gradalign.experiments.device import amp_dtype, autocast, resolve_device
from gradalign.experiments.models import build_model
from gradalign.experiments.steps import Optimizer
from gradalign.experiments.train import evaluate

MODELS = {  # kind: (classes, options, optimizer, lr, batch) as in gvr-cifar100 / gwa-cifar10
    "resnet18": (100, {}, "sgd", 0.05, 128),
    "vit": (10, {}, "adam", 1e-4, 256),
    "convnext": (10, {}, "adam", 1e-3, 512),
}
GVR = {"gvr_mode": "autograd", "gvr_layers": "last_stage", "subset": 32, "subset_forward": "separate"}
VARIANTS = {
    "resnet18": {"SGD": ("baseline", {}),
                 "two views, plain": ("two_view", {"gvr_mode": "closed_form", "gvr_layers": "head", "subset": 32,
                                                   "subset_forward": "shared"}),
                 "two views, alpha = 0 (control)": ("two_view", {**GVR}),
                 "GVR faithful": ("gvr", {**GVR, "alpha": 0.01}),
                 "GVR closed form": ("gvr", {"gvr_mode": "closed_form", "gvr_layers": "head", "subset": 32,
                                             "subset_forward": "shared", "alpha": 0.01})},
    "vit": {"Adam, no monitor": ("baseline", {"monitor": False}), "Adam + GWA monitor": ("baseline", {})},
    "convnext": {"Adam, no monitor": ("baseline", {"monitor": False}), "Adam + GWA monitor": ("baseline", {})},
}


class NoMonitor:
    def update(self, *args):
        pass

    def end_epoch(self):
        pass

    def remove(self):
        pass


def make_variants(kind: str, batch: int, device: torch.device, precision: str) -> tuple[dict, dict]:
    classes, options, optimizer, lr, default_batch = MODELS[kind]
    B = batch or default_batch
    torch.manual_seed(0)
    base = build_model(kind, num_classes=classes, **options)
    channels_last = device.type == "cuda" and base.channels_last
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (B, 3, 32, 32), generator=g, dtype=torch.uint8).to(device)
    y = torch.randint(0, classes, (B,), generator=g).to(device)
    ids = torch.arange(B, device=device)
    mean, std = NORMALIZATION["cifar100" if classes == 100 else "cifar10"]
    pipeline = ImagePipeline(mean, std, cutout=16 if kind == "resnet18" else 0, channels_last=channels_last)
    amp = autocast(device, precision)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def fresh():
        model = copy.deepcopy(base)
        model.to(device, memory_format=torch.channels_last) if channels_last else model.to(device)
        return model.train()

    def train_step(method: str, extra: dict):
        model = fresh()
        extra = dict(extra)
        monitor = ga.GWAMonitor(model.head) if extra.pop("monitor", True) else NoMonitor()
        p = {"lr": lr, "momentum": 0.9 if optimizer == "sgd" else 0.0, "weight_decay": 5e-4 if optimizer == "sgd" else 0.0,
             "batch_size": B, "augment": True, **method_params(method, extra)}
        optim = Optimizer(model, optimizer, "none", p, budget=10**9)
        gens = {k: torch.Generator().manual_seed(i) for i, k in enumerate(("order", "augment", "gvr"))}
        step = METHODS[method].step(model, optim, monitor, p, gens, pipeline)
        step.autocast = amp
        calls = iter(range(1, 1 << 62))

        def run():
            step(x, y, ids, B)
            if next(calls) % 100 == 0:                  # an epoch's scoring, amortised as in training
                monitor.end_epoch()
            sync()
        return run

    def eval_step():
        model = fresh()
        split = type("S", (), {"x": x, "y": y, "__len__": lambda self: B})()

        def run():
            evaluate(model, split, batch_size=B, prepare=pipeline.prepare, autocast=amp)
            sync()
        return run

    variants = {name: train_step(method, extra) for name, (method, extra) in VARIANTS[kind].items()}
    variants["eval (forward only)"] = eval_step()
    return variants, {"B": B, "params": sum(p.numel() for p in base.parameters())}


def method_params(method: str, extra: dict) -> dict:
    """The method's own parameter defaults (the method table's), overridden by `extra`."""
    entry = METHODS[method]
    return {**{p.name: p.default for p in entry.params}, **dict(entry.fixed), **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--models", default="resnet18,vit,convnext")
    parser.add_argument("--batch", type=int, default=0, help="batch size (default: each config's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", default="auto", help="auto (bf16 on a GPU, fp32 on a CPU), fp32 or bf16")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        where = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    else:
        where = f"cpu, {torch.get_num_threads()} threads, torch {torch.__version__}"
    dtype = amp_dtype(device, args.precision)
    print(f"{where}; {'bf16 autocast' if dtype else 'float32'}; {args.rounds} rounds (median)\n")
    rows = []
    for kind in args.models.split(","):
        variants, info = make_variants(kind, args.batch, device, args.precision)
        medians = time_variants(variants, rounds=args.rounds, warmup=args.warmup, min_seconds=0.0)
        first = next(iter(medians.values()))
        for name, seconds in medians.items():
            train = not name.startswith("eval")
            rows.append({"model": kind, "B": info["B"], "variant": name, "ms / step": seconds * 1e3,
                         "images / s": info["B"] / seconds, "x first": seconds / first if train else float("nan")})
        print(f"  done {kind} ({info['params']:,} parameters)", file=sys.stderr)
    print_table(rows, ["model", "B", "variant", "ms / step", "images / s", "x first"])


if __name__ == "__main__":
    main()

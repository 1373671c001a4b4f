"""Step time of each method as a ratio to a plain Adam step, seed MLP on mnist1d-shaped input.

    python -m benchmarks.methods            # B = 32 and 128
    python -m benchmarks.methods --quick

Variants (each on its own copy of the model and its own Adam):
  adam              forward, mean cross-entropy, backward, optimizer.step()   (the reference)
  adam + GWA        the same plus GWAMonitor.update() before the step, and end_epoch()
                    (which scores the epoch) every 100 steps
  GASW, GDSW        engine.backward(losses, weights=GASW/GDSW(2)) then the step
  GAGA / sample     per sample processed, increments of B, a step every 4 increments,
                    against adam's time per sample at batch B
  two-view adam     CE(view 1) + CE(view 2), one backward, the step (what GVR's arms cost
                    without the penalty; ratio also against one view)
  GVR autograd      faithful: create_graph gradients of the head on a subset of 32, double backprop
  GVR closed form   the same penalty from the head's logits and inputs, no create_graph pass
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F

from benchmarks.timing import print_table, time_variants

import gradalign as ga
from gradalign.experiments.models import build_model


def make_variants(B: int) -> dict:
    torch.manual_seed(0)
    base = build_model("mlp")
    x = torch.randn(B, 40)
    x2 = x + 0.05 * torch.randn(B, 40)
    y = torch.randint(0, 10, (B,))
    ids = torch.arange(B)

    def fresh():
        model = copy.deepcopy(base)
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)

    def adam_step():
        model, opt = fresh()

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return step

    def gwa_step():
        model, opt = fresh()
        monitor = ga.GWAMonitor(model.head)
        calls = iter(range(1, 1 << 62))

        def step():  # an epoch of 100 steps: end_epoch's scoring is included, amortised
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            F.cross_entropy(logits, y).backward()
            monitor.update(logits.detach(), y, ids)
            opt.step()
            if next(calls) % 100 == 0:
                monitor.end_epoch()
        return step

    def weighted_step(method):
        model, opt = fresh()
        engine = ga.PerSampleGradients(model)

        def step():
            opt.zero_grad(set_to_none=True)
            engine.backward(F.cross_entropy(model(x), y, reduction="none"), weights=method(gamma=2.0))
            opt.step()
        return step

    def gaga_increment():
        model, opt = fresh()
        engine = ga.PerSampleGradients(model)
        acc = ga.GSNRAccumulator(tau=float("inf"), increment=B, max_samples=4 * B)

        def step():  # one increment of B samples; the optimizer steps every 4th call
            losses = F.cross_entropy(model(x), y, reduction="none")
            if acc.update(engine.backward(losses, write_grad=False)):
                engine.set_grad(acc.mean_grad())
                opt.step()
        return step

    def two_view_step():
        model, opt = fresh()

        def step():
            opt.zero_grad(set_to_none=True)
            (F.cross_entropy(model(x), y) + F.cross_entropy(model(x2), y)).backward()
            opt.step()
        return step

    def gvr_step(mode):
        model, opt = fresh()
        gvr = ga.GVR(alpha=0.01, layers=model.head, subset=32, mode=mode, generator=torch.Generator().manual_seed(0))

        def step():
            opt.zero_grad(set_to_none=True)
            total, _ = gvr.loss(model, x, x2, y)
            total.backward()
            opt.step()
        return step

    return {
        "adam": adam_step(), "adam + GWA": gwa_step(), "GASW": weighted_step(ga.GASW),
        "GDSW": weighted_step(ga.GDSW), "GAGA / sample": gaga_increment(), "two-view adam": two_view_step(),
        "GVR autograd": gvr_step("autograd"), "GVR closed form": gvr_step("closed_form"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 rounds instead of --rounds")
    parser.add_argument("--rounds", type=int, default=21, help="timing rounds (median over rounds)")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    args = parser.parse_args()
    rounds = 5 if args.quick else args.rounds
    print(f"torch {torch.__version__}, cpu, threads {torch.get_num_threads()}, {rounds} rounds; "
          "median ms per step, ratio to a plain Adam step (one view unless stated)\n")
    rows = []
    for B in args.batches:
        medians = time_variants(make_variants(B), rounds=rounds)
        adam, two_view = medians["adam"], medians["two-view adam"]
        for name, seconds in medians.items():
            row = {"B": B, "variant": name, "ms": seconds * 1e3, "x adam": seconds / adam}
            if name.startswith("GVR") or name == "two-view adam":
                row["x two-view"] = seconds / two_view
            rows.append(row)
        print(f"  done B={B}", file=sys.stderr)
    print_table(rows, ["B", "variant", "ms", "x adam", "x two-view"])
    print("\nGAGA / sample: one increment of B samples (engine + accumulator, a step every 4th), "
          "against one Adam step on B samples: the ratio is per sample processed.")


if __name__ == "__main__":
    main()

"""Where the time of one engine step goes, and counts that do not depend on the machine's load.

    python -m benchmarks.profile_engine --models wide_mlp vit_linear mlp --variants plain clip gasw
    python -m benchmarks.profile_engine --models wide_mlp --variants gasw --where   # the time table

For each (model, variant) one step is run under torch.profiler (after warm-up steps) and
reported with:
  ops       operator calls (top-level aten calls, those inside the autograd engine included)
  products  matrix products (mm, addmm, bmm, baddbmm, matmul-like, convolutions)
  MMACs     their multiply-adds, from the recorded shapes, in millions
Counts are exact and load-independent, so two implementations can be compared on a busy
machine by their counts; the times in `--where` are the profiler's, on whatever load there is.

`--where` attributes the step's CPU time to phases: the model's forward, the engine's phases and
each statistic of each unit, labelled with its parameters and the route it takes (the engine's
`trace` labels, engine/phases.py).

`--diff` sets the variant's step beside a plain step operator by operator: each op (with its input
shapes) and its self CPU time per step in both, profiled alternately in one process (means over
`--steps` steps of each), largest difference first; what the engine adds (its own operators) and
what it makes slower (a weight-gradient product reading its factors out of cache):

    python -m benchmarks.profile_engine --models wide_mlp --variants clip --diff --steps 10

`--phases` times the engine's phases without the profiler (which adds time to every operator
call): wall-clock medians of `--steps` steps, each engine phase timed through the engine's
`trace` callback, beside a plain step run alternately:

    python -m benchmarks.profile_engine --models vit_linear --variants clip --phases --steps 41
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import math
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import gradalign as ga
from benchmarks.models import BATCHES, MODELS, batch, build_model, clip_weights, per_sample_losses
from gradalign.engine.phases import PHASES

_PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::mv", "aten::addmv",
             "aten::dot", "aten::vdot", "aten::mkldnn_convolution", "aten::convolution_backward",
             "aten::_convolution", "aten::_slow_conv2d_forward", "aten::_scaled_dot_product_flash_attention_for_cpu"}


def macs(name: str, shapes: list) -> int:
    """Multiply-adds of one matrix product from its input shapes (0 where not a plain product)."""
    try:
        if name in ("aten::mm",):
            (m, k), (_, n) = shapes[0], shapes[1]
            return m * k * n
        if name in ("aten::addmm",):
            (m, k), (_, n) = shapes[1], shapes[2]
            return m * k * n
        if name in ("aten::bmm",):
            (b, m, k), (_, _, n) = shapes[0], shapes[1]
            return b * m * k * n
        if name in ("aten::baddbmm", "aten::addbmm"):
            (b, m, k), (_, _, n) = shapes[1], shapes[2]
            return b * m * k * n
        if name in ("aten::mv", "aten::dot", "aten::vdot"):
            return math.prod(shapes[0])
        if name == "aten::addmv":
            return math.prod(shapes[1])
    except (ValueError, IndexError, TypeError):
        return 0
    return 0


def _top_level_aten(events):
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            yield e


def counts(events) -> dict:
    """ops, products and multiply-adds of one profiled step."""
    ops = list(_top_level_aten(events))
    products = [e for e in events if e.name in _PRODUCTS]
    return {"ops": len(ops), "products": len(products),
            "MMACs": sum(macs(e.name, e.input_shapes) for e in products) / 1e6,
            "by op": collections.Counter(e.name for e in ops)}


def make_step(kind: str, B: int, variant: str, trace=None):
    """One step of `variant` on a fresh model; the engine's phases go to `trace` (engine/phases.py)."""
    torch.manual_seed(0)
    model = build_model(kind)
    x, y = batch(kind, B)
    if variant == "plain":
        def step():
            model.zero_grad(set_to_none=True)
            with record_function("ga/model forward"):
                loss = per_sample_losses(kind, model(x), y).mean()
            with record_function("ga/plain backward"):
                loss.backward()
        return step
    engine = ga.PerSampleGradients(model, trace=trace)
    read = {"norms": lambda e, l: e.backward(l).norms,
            "clip": lambda e, l: e.backward(l, weights=clip_weights, release=True),
            "gasw": lambda e, l: e.backward(l, weights=ga.GASW(2.0), release=True),
            "gaga": lambda e, l: e.backward(l).grad_sq_sum}[variant]

    def step():
        model.zero_grad(set_to_none=True)
        with record_function("ga/model forward"):
            losses = per_sample_losses(kind, model(x), y)
        read(engine, losses)
    return step


def phases(kind: str, B: int, variant: str, steps: int) -> dict[str, float]:
    """Median wall-clock ms per engine phase (engine/phases.PHASES) over `steps` steps, without the
    profiler; "forward and the rest" is the step minus those phases; "plain step" a plain step
    run alternately."""
    spent = collections.defaultdict(float)

    @contextlib.contextmanager
    def timer(name):
        start = time.perf_counter()
        try:
            yield
        finally:
            if name in PHASES:  # the per-unit statistics nest inside the phases
                spent[name] += time.perf_counter() - start

    plain, step = make_step(kind, B, "plain"), make_step(kind, B, variant, trace=timer)
    for _ in range(3):
        plain(), step()
    samples = collections.defaultdict(list)
    for _ in range(steps):
        start = time.perf_counter()
        plain()
        samples["plain step"].append(time.perf_counter() - start)
        spent.clear()
        start = time.perf_counter()
        step()
        total = time.perf_counter() - start
        samples["step"].append(total)
        samples["forward and the rest"].append(total - sum(spent.values()))
        for label, seconds in spent.items():
            samples[label].append(seconds)
    return {label: 1e3 * statistics.median(v) for label, v in samples.items()}


def op_diff(kind: str, B: int, variant: str, steps: int) -> list[tuple[float, float, float, str, str]]:
    """[(variant minus plain, variant, plain)] self CPU microseconds per step of each operator and
    its input shapes, the two steps profiled alternately (means over `steps` steps), largest
    difference first, with the op's name and shapes."""
    plain, step = make_step(kind, B, "plain"), make_step(kind, B, variant)
    for _ in range(3):
        plain(), step()
    spent = {"plain": collections.Counter(), "variant": collections.Counter()}
    for _ in range(steps):
        for name, fn in (("plain", plain), ("variant", step)):
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                fn()
            for e in prof.key_averages(group_by_input_shape=True):
                if not e.key.startswith("ga/"):
                    spent[name][(e.key, str(e.input_shapes))] += e.self_cpu_time_total / steps
    keys = set(spent["plain"]) | set(spent["variant"])
    rows = [(spent["variant"][k] - spent["plain"][k], spent["variant"][k], spent["plain"][k], *k) for k in keys]
    return sorted(rows, reverse=True)


def where(events) -> dict[str, float]:
    """Exclusive CPU ms per ga/ label (time inside nested ga/ labels goes to those)."""
    out = collections.defaultdict(float)
    for e in events:
        if not e.name.startswith("ga/"):
            continue
        inner = 0.0
        stack = list(e.cpu_children)
        while stack:
            c = stack.pop()
            if c.name.startswith("ga/"):
                inner += c.cpu_time_total
            else:
                stack.extend(c.cpu_children)
        out[e.name[3:]] += (e.cpu_time_total - inner) / 1e3
    return dict(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["wide_mlp", "vit_linear", "mlp"], choices=list(MODELS))
    parser.add_argument("--batches", type=int, nargs="+", help="default: the issue's (wide_mlp 256, vit_linear 64, mlp 128)")
    parser.add_argument("--variants", nargs="+", default=["plain", "norms", "clip", "gasw"])
    parser.add_argument("--where", action="store_true", help="the time of one step per phase and route")
    parser.add_argument("--ops", action="store_true", help="list the operator calls of each step")
    parser.add_argument("--phases", action="store_true", help="wall-clock medians per engine phase, no profiler")
    parser.add_argument("--diff", action="store_true", help="each operator's self CPU time beside a plain step's")
    parser.add_argument("--top", type=int, default=20, help="--diff: the operators listed")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (times: the median step's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    default_batch = {"wide_mlp": 256, "vit_linear": 64, "mlp": 128}
    if args.diff:
        for kind in args.models:
            for B in args.batches or [default_batch.get(kind, BATCHES[kind][0])]:
                for variant in (v for v in args.variants if v != "plain"):
                    rows = op_diff(kind, B, variant, args.steps)
                    total, engine, base = (sum(r[i] for r in rows) / 1e3 for i in range(3))
                    print(f"\n{kind} B={B} {variant}: self CPU {engine:.2f} ms per step, plain {base:.2f} ms "
                          f"(+{total:.2f} ms; means of {args.steps} alternate profiled steps)")
                    print("| + us | us | plain us | op | input shapes |\n|---|---|---|---|---|")
                    for delta, mine, theirs, op, shapes in rows[:args.top]:
                        print(f"| {delta:.0f} | {mine:.0f} | {theirs:.0f} | {op} | {shapes} |")
                    rest = sum(r[0] for r in rows[args.top:])
                    print(f"| {rest:.0f} | | | the other {len(rows) - args.top} | |")
        return
    if args.phases:
        for kind in args.models:
            for B in args.batches or [default_batch.get(kind, BATCHES[kind][0])]:
                for variant in (v for v in args.variants if v != "plain"):
                    table = phases(kind, B, variant, args.steps)
                    print(f"\n{kind} B={B} {variant}: {table['step']:.2f} ms per step, plain {table['plain step']:.2f} "
                          f"ms ({table['step'] / table['plain step']:.2f}x; medians of {args.steps} steps)")
                    for label, ms in table.items():
                        if label not in ("step", "plain step"):
                            print(f"  {ms:8.2f} ms  {label}")
        return
    print(f"torch {torch.__version__}, 1 thread\n")
    print("| model | B | variant | ops | products | MMACs | ms (profiled) |")
    print("|---|---|---|---|---|---|---|")
    tables = {}
    for kind in args.models:
        for B in args.batches or [default_batch.get(kind, BATCHES[kind][0])]:
            for variant in args.variants:
                step = make_step(kind, B, variant, trace=lambda name: record_function("ga/" + name))
                for _ in range(3):
                    step()
                runs = []
                for _ in range(args.steps):
                    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                        step()
                    events = prof.events()
                    total = sum(e.cpu_time_total for e in events if e.cpu_parent is None and e.name.startswith("ga/"))
                    runs.append((total, events))
                runs.sort(key=lambda r: r[0])
                total, events = runs[len(runs) // 2]
                c = counts(events)
                print(f"| {kind} | {B} | {variant} | {c['ops']} | {c['products']} | {c['MMACs']:.1f} | {total / 1e3:.2f} |")
                if args.ops:
                    print("    " + ", ".join(f"{n[6:]} {k}" for n, k in c["by op"].most_common()))
                tables[(kind, B, variant)] = where(events)
    if args.where:
        for (kind, B, variant), table in tables.items():
            total = sum(table.values())
            print(f"\n{kind} B={B} {variant}: {total:.2f} ms profiled")
            for label, ms in sorted(table.items(), key=lambda kv: -kv[1]):
                print(f"  {ms:8.2f} ms  {100 * ms / total:5.1f}%  {label}")


if __name__ == "__main__":
    main()

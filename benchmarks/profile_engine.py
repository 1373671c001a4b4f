"""Where the time of one engine step goes, and counts that do not depend on the machine's load.

    python benchmarks/profile_engine.py --models wide_mlp vit_linear mlp --variants plain clip gasw
    python benchmarks/profile_engine.py --models wide_mlp --variants gasw --where   # the time table

For each (model, variant) one step is run under torch.profiler (after warm-up steps) and
reported with:
  ops       operator calls (top-level aten calls, those inside the autograd engine included)
  products  matrix products (mm, addmm, bmm, baddbmm, matmul-like, convolutions)
  MMACs     their multiply-adds, from the recorded shapes, in millions
Counts are exact and load-independent, so two implementations can be compared on a busy
machine by their counts; the times in `--where` are the profiler's, on whatever load there is.

`--where` attributes the step's CPU time to phases: the model's forward, the backward to the
layer outputs, the rules, and each statistic of each per-sample representation, labelled by
the route it takes (`persample.route`) and the layer kind that produced it.

`--phases` times the engine's phases without the profiler (which adds time to every operator
call): wall-clock medians of `--steps` steps, each engine phase timed by wrapping its method,
beside a plain step run alternately:

    python benchmarks/profile_engine.py --models vit_linear --variants clip --phases --steps 41
"""
from __future__ import annotations

import argparse
import collections
import functools
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).parent))
from engine import BATCHES, MODELS, build, clip_weights, per_sample_losses  # noqa: E402

import gradalign as ga  # noqa: E402
from gradalign.engine import capture, persample, units  # noqa: E402
from gradalign.engine.capture import PerSampleGradients  # noqa: E402
from gradalign.engine.gradient_stats import GradientStats  # noqa: E402

_PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::mv", "aten::addmv",
             "aten::dot", "aten::vdot", "aten::mkldnn_convolution", "aten::convolution_backward",
             "aten::_convolution", "aten::_slow_conv2d_forward", "aten::_scaled_dot_product_flash_attention_for_cpu"}
_UNIT_STATS = ("sq_norms", "add_gram", "sums", "dots", "cosine_terms", "weighted", "sq_sums")


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


def _unit_label(unit, method: str, *args) -> str:
    """'<layer kind>.<param> [route]: method' for a unit of engine/units.py."""
    if isinstance(unit, units.Layer):
        rep = unit.rep
        T = rep.A.shape[2]
        if method in ("add_gram", "cosine_terms", "dots"):  # the cosine route, persample.cosine_route
            given = bool(args and args[0] is not None)
            route = {"gram": "Gram", "factors": "d S a", "materialise": "formed chunks"}[rep.cosine_route(given)]
            route = route if method != "dots" else "d S a"
        elif method == "sq_norms":
            route = "2-D" if T == 1 else ("ghost" if rep._ghost_is_cheaper() else "materialised")
        else:  # sums, weighted sums, sums of squares: one product of the factors
            route = "factors"
        kind = getattr(rep, "_kind", "Factored") + (" + bias" if unit.bias else "")
        return f"{kind} [{route}]: {method}"
    if isinstance(unit, units.DenseBlock):
        return f"small dense parameters ({len(unit.names)}, one block): {method}"
    return f"{getattr(unit.rep, '_kind', type(unit.rep).__name__)} [{type(unit.rep).__name__}]: {method}"


def instrument() -> None:
    """Wrap the engine's phases, each unit's statistics (engine/units.py) and the weighting in
    profiler labels; time inside a nested label goes to that label (`where`)."""
    def wrap(owner, name, label):
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            with record_function("ga/" + label(*args)):
                return original(*args, **kwargs)
        setattr(owner, name, wrapped)

    for cls in (units.Layer, units.DenseBlock, units.Single):
        for method in _UNIT_STATS:
            if method in vars(cls):
                wrap(cls, method, lambda unit, *a, _m=method: _unit_label(unit, _m, *a))
    for name, label in (("_backward_to_outputs", "backward to the layer outputs"),
                        ("_per_sample_grads", "rules (factors from inputs and output gradients)"),
                        ("_write_grad", "write p.grad")):
        wrap(PerSampleGradients, name, lambda *_, _l=label: _l)
    wrap(capture, "rescale", lambda *_: "loss scale (one power of two per backward)")
    for name in ("_cosine_terms", "_sq_norms", "cosines"):  # the per-unit terms summed, the ratios formed
        prop = vars(GradientStats)[name]
        inner = prop.func

        def func(self, _inner=inner, _name=name):
            with record_function(f"ga/statistics: combine units ({_name})"):
                return _inner(self)
        prop.func = func
    wrap(ga.GASW, "__call__", lambda *_: "GASW weights from the cosines")
    # the layer kind that produced each representation: set by the rule wrappers below
    from gradalign.engine import rules as rules_pkg
    registry = rules_pkg.default_registry

    def tagged_registry():
        reg = registry()
        for module_type, rule in list(reg._rules.items()):
            kind = module_type.__name__ if isinstance(module_type, type) else module_type.rsplit(".", 1)[-1]

            def compute(module, args, grad_output, _compute=rule.compute, _kind=kind):
                out = _compute(module, args, grad_output)
                for name, g in out.items():
                    tag = f"{_kind}.{name.split('.')[-1]}"
                    if isinstance(g, persample.Factored) and g.A.shape[2] > 1:
                        tag += f" (T={g.A.shape[2]})"
                    try:
                        g._kind = tag
                    except AttributeError:
                        pass
                return out
            reg._rules[module_type] = type(rule)(**{**rule.__dict__, "compute": compute})
        return reg
    capture.default_registry = tagged_registry


def make_step(kind: str, B: int, variant: str):
    torch.manual_seed(0)
    model, shape = build(kind)
    if kind == "gpt2":  # token ids, the targets the same ids (shifted inside the loss)
        x = torch.randint(0, 1000, (B, *shape))
        y = x
    else:
        x, y = torch.randn(B, *shape), torch.randint(0, 10, (B,))
    if variant == "plain":
        def step():
            model.zero_grad(set_to_none=True)
            with record_function("ga/model forward"):
                loss = per_sample_losses(kind, model(x), y).mean()
            with record_function("ga/plain backward"):
                loss.backward()
        return step
    engine = ga.PerSampleGradients(model)
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


# the engine's methods timed by --phases, in the order a step runs them
_PHASES = [(capture.PerSampleGradients, "_backward_to_outputs", "backward to the layer outputs"),
           (capture, "rescale", "loss scale"),
           (capture.PerSampleGradients, "_per_sample_grads", "rules (the per-sample representations)"),
           (capture.PerSampleGradients, "_resolve_weights", "the weighting and the statistics it reads"),
           (GradientStats, "release_into", "weighted p.grad"),
           (GradientStats, "weighted_sum", "weighted p.grad")]


def phases(kind: str, B: int, variant: str, steps: int) -> dict[str, float]:
    """Median wall-clock ms per phase over `steps` steps, without the profiler; "forward and
    the rest" is the step minus the timed phases; "plain step" a plain step run alternately."""
    spent = collections.defaultdict(float)
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in _PHASES]
    for (owner, name, label), (_, _, inner) in zip(_PHASES, originals):
        def timed(*args, _inner=inner, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                spent[_label] += time.perf_counter() - start
        setattr(owner, name, timed)
    try:
        plain, step = make_step(kind, B, "plain"), make_step(kind, B, variant)
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
    finally:
        for owner, name, inner in originals:
            setattr(owner, name, inner)
    return {label: 1e3 * statistics.median(v) for label, v in samples.items()}


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
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (times: the median step's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    default_batch = {"wide_mlp": 256, "vit_linear": 64, "mlp": 128}
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
    instrument()
    print(f"torch {torch.__version__}, 1 thread\n")
    print("| model | B | variant | ops | products | MMACs | ms (profiled) |")
    print("|---|---|---|---|---|---|---|")
    tables = {}
    for kind in args.models:
        for B in args.batches or [default_batch.get(kind, BATCHES[kind][0])]:
            for variant in args.variants:
                step = make_step(kind, B, variant)
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

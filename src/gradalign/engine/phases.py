"""Named phases of one engine step, for profilers and timers: `PerSampleGradients(model, trace=...)`.

`trace` is a callable name -> context manager; the engine enters `trace(name)` around each
phase of `backward`, in this order:

    BACKWARD    the one backward, asked for the layer-output gradients (and S where wanted)
    LOSS_SCALE  the power of two the output gradients are divided by (engine/scale.py)
    RULES       the layer rules: (inputs, output gradients) -> per-sample representations
    WEIGHTS     the weighting callable and the statistics it reads
    WRITE       the (weighted) mean gradient formed and written to p.grad

and, nested inside those (or inside any later read of a statistic), around every statistic of
every unit (engine/units.py): "unit <parameter names> [<route>]: <statistic>". For example

    engine = ga.PerSampleGradients(model, trace=torch.profiler.record_function)   # profiler labels

or a timer that sums wall-clock seconds per phase name (`benchmarks/profile_engine.py --phases`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

Trace = Callable[[str], ContextManager] | None

BACKWARD = "backward to the layer outputs"
LOSS_SCALE = "loss scale"
RULES = "rules (the per-sample representations)"
WEIGHTS = "the weighting and the statistics it reads"
WRITE = "weighted p.grad"
PHASES = (BACKWARD, LOSS_SCALE, RULES, WEIGHTS, WRITE)


def phase(trace: Trace, name: str) -> ContextManager:
    """`trace(name)`, or a context that does nothing when there is no trace."""
    return contextlib.nullcontext() if trace is None else trace(name)


class TracedUnit:
    """A unit of engine/units.py whose every statistic runs inside `trace("unit ...: <method>")`."""

    STATISTICS = ("sq_norms", "sums", "dots", "cosine_terms", "add_gram", "weighted", "sq_sums")

    def __init__(self, unit, trace: Callable[[str], ContextManager]):
        self.unit, self.trace = unit, trace

    def __getattr__(self, name: str):
        value = getattr(self.unit, name)
        if name not in self.STATISTICS:
            return value

        def traced(*args, **kwargs):
            with self.trace(f"unit {'+'.join(self.unit.names)} [{self.unit.route(name, *args)}]: {name}"):
                return value(*args, **kwargs)
        return traced

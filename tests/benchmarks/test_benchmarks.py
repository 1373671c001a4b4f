"""The benchmark scripts' measuring parts: the CPU peak-memory count (the README's memory
columns) and the wall-clock phase split of profile_engine --phases."""
import contextlib

import pytest
import torch
from torch import nn

import gradalign as ga
from benchmarks import profile_engine, timing
from gradalign.engine.phases import PHASES


def test_peak_memory_counts_new_storages_not_views_of_existing_ones():
    weight = torch.randn(512, 512)  # 1 MiB that exists before the step
    x = torch.randn(256, 512)

    def step():
        y = x @ weight.t()          # a view of the weight (not new), then a new (256, 512): 0.5 MiB
        z = y.relu_()               # in place: not new
        del y, z
        tmp = torch.empty(1024, 1024)  # 4 MiB, freed before the next one
        del tmp
        torch.empty(256, 1024)      # 1 MiB

    peak = timing.peak_memory_mb(step, torch.device("cpu"), lambda: None)
    assert peak == pytest.approx(4.0, abs=1e-6)  # the 4 MiB alone; the 0.5 MiB freed before it


def test_profile_engine_phases_cover_the_step():
    table = profile_engine.phases("mlp", 8, "gasw", steps=3)
    phases = [k for k in table if k not in ("step", "plain step", "forward and the rest")]
    assert set(PHASES) <= set(phases)
    assert all(v > 0 for v in table.values())


def test_trace_sees_every_phase_in_order_and_every_unit_statistic():
    """The engine's `trace` hook: the phases of a GASW backward in their order, and each unit's
    statistics nested inside them, labelled with the parameters and the route."""
    seen, depth = [], [0]

    @contextlib.contextmanager
    def trace(name):
        seen.append((depth[0], name))
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    engine = ga.PerSampleGradients(model, trace=trace)
    losses = nn.functional.cross_entropy(model(torch.randn(5, 4)), torch.randint(0, 3, (5,)), reduction="none")
    engine.backward(losses, weights=ga.GASW(2.0))
    assert [name for d, name in seen if d == 0] == list(PHASES)
    units = [name for d, name in seen if d == 1]
    assert "unit 2.weight+2.bias [Factored T=1 + bias, factors]: weighted" in units
    assert any(name.startswith("unit 0.weight+0.bias [Factored T=1 + bias, ") and name.endswith(": add_gram")
               for name in units), units

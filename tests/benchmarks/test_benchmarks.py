"""The benchmark scripts' measuring parts: the CPU peak-memory count (the README's memory
columns) and the wall-clock phase split of profile_engine --phases."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import timing  # noqa: E402


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
    import profile_engine
    table = profile_engine.phases("mlp", 8, "gasw", steps=3)
    phases = [k for k in table if k not in ("step", "plain step", "forward and the rest")]
    assert {"backward to the layer outputs", "rules (the per-sample representations)",
            "the weighting and the statistics it reads", "weighted p.grad"} <= set(phases)
    assert all(v > 0 for v in table.values())
    # the wrappers are removed afterwards
    from gradalign.engine import capture
    assert capture.PerSampleGradients._backward_to_outputs.__name__ == "_backward_to_outputs"

"""Shared benchmark helpers: interleaved timing with medians, peak tensor memory, a plain table.

The machines are noisy, so every variant is timed in the same process, interleaved round
by round, and reported as the median and the ratio of medians to the plain step.
"""
from __future__ import annotations

import gc
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def median_seconds(fn: Callable[[], object], repeats: int, setup: Callable[[], None] | None = None) -> float:
    """Median seconds of `repeats` calls of fn, each after `setup` (untimed) where given."""
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_variants(variants: dict[str, Callable[[], None]], *, rounds: int, warmup: int = 3,
                  min_seconds: float = 0.02) -> dict[str, float]:
    """Median seconds per call of each variant, timed interleaved in random order per round.

    Each timing sample runs a variant enough times to last about `min_seconds`.
    """
    repeats = {}
    for name, fn in variants.items():
        for _ in range(warmup):
            fn()
        start = time.perf_counter()
        fn()
        repeats[name] = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-6)))
    samples = {name: [] for name in variants}
    order = list(variants)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            fn, k = variants[name], repeats[name]
            start = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - start) / k)
    return {name: statistics.median(s) for name, s in samples.items()}


class _HeldStorages(TorchDispatchMode):
    """Counts the bytes of the CPU tensor storages that operators create while it is active and
    that are still alive, and the largest such count (`peak`). A result sharing an argument's
    storage (a view, an in-place result) is not counted: that memory existed before."""

    def __init__(self, extra: Callable[[], int] | None = None):
        super().__init__()
        self.live: dict[int, int] = {}
        self.held = self.peak = 0
        self.extra = extra  # bytes held outside the counted storages, sampled at every operator

    def _freed(self, key: int) -> None:
        self.held -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view or in-place result shares an argument's storage (a parameter's transpose, a
        # detached input): memory that existed before, not created here
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and key not in inputs:
                    self.live[key] = storage.nbytes()
                    self.held += storage.nbytes()
                    weakref.finalize(storage, self._freed, key)
        self.peak = max(self.peak, self.held + (self.extra() if self.extra is not None else 0))
        return out


def peak_memory_mb(step: Callable[[], None], device: torch.device, free_grads: Callable[[], None],
                   extra: Callable[[], int] | None = None) -> float:
    """Extra memory one step needs at its peak, in MB, above the memory held once the previous
    step's gradients are freed (`free_grads`, what the step's own zero_grad does first).

    CUDA: torch.cuda.max_memory_allocated above what is allocated then. CPU: the largest total
    size of the tensor storages created during the step and alive at once (every operator call
    watched by a dispatch mode; each storage counted until it is freed): exact, and independent
    of the load and of the C allocator, which keeps freed memory in the resident set. `extra`:
    bytes held in storages the count cannot see, sampled at every operator (FSDP's unsharded
    parameters live in storages resized in place, not created by an operator).
    """
    step()
    free_grads()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with _HeldStorages(extra) as held:
        step()
    return held.peak / 2**20


def memory_in_subprocess(module: str, args: list[str]) -> float:
    """Run `python -m module --measure-memory ARGS` (from the repository root) in a fresh
    interpreter; it prints one JSON number."""
    out = subprocess.run([sys.executable, "-m", module, "--measure-memory", *args], cwd=Path(__file__).parents[1],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A Markdown table of `rows` (dicts) with the given column order."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |")

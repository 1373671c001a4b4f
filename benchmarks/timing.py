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
from typing import Callable

import torch


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


def peak_memory_mb(step: Callable[[], None], device: torch.device) -> float:
    """Extra memory one step needs at its peak, in MB: the largest rise of the memory held by
    tensors above its lowest point before it within the step (after the step's own zero_grad
    has freed the previous gradients).

    CUDA: torch.cuda.max_memory_allocated above what was allocated before the step. CPU: every
    tensor allocation and free of the step, recorded by torch.profiler (profile_memory=True),
    replayed in order; one step runs first inside the recording so that its tensors' frees are
    known. Exact and independent of the machine's load (the resident set size is not: the C
    allocator keeps freed memory)."""
    gc.collect()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile, record_function
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
        with record_function("measured step"):
            step()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    start = next(e for e in events if e.name == "measured step").time_range.start
    held, lowest, rise = 0, None, 0
    for e in events:
        if lowest is None and e.time_range.start >= start:
            lowest = held
        held += e.self_cpu_memory_usage
        if lowest is not None:
            lowest = min(lowest, held)
            rise = max(rise, held - lowest)
    return rise / 2**20


def memory_in_subprocess(script: str, args: list[str]) -> float:
    """Run `script --measure-memory ARGS` in a fresh interpreter; it prints one JSON number."""
    out = subprocess.run([sys.executable, script, "--measure-memory", *args],
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

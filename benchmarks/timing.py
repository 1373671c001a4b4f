"""Shared benchmark helpers: interleaved timing with medians, peak memory, a plain table.

The machines are noisy, so every variant is timed in the same process, interleaved round
by round, and reported as the median and the ratio of medians to the plain step.
"""
from __future__ import annotations

import gc
import json
import random
import resource
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


def _status_kb(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in kB, None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_mb(step: Callable[[], None], device: torch.device, steps: int = 3) -> float:
    """Extra memory one step needs at its peak, in MB.

    CUDA: torch.cuda.max_memory_allocated above what was allocated before the step.
    CPU on Linux: the peak resident set (VmHWM, its mark reset just before) above the
    resident set before the steps. Elsewhere: growth of getrusage's max RSS, meaningful only
    in a fresh process that ran nothing bigger before (see `memory_in_subprocess`); note
    that a child process inherits its parent's value, which is why Linux avoids it.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if _reset_peak_rss() and _status_kb("VmHWM") is not None:
        before, peak = _status_kb("VmRSS"), lambda: _status_kb("VmHWM")
    else:
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
        before = peak()
    for _ in range(steps):
        step()
    return (peak() - before) / 1024


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

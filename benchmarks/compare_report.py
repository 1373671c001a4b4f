"""The comparison's printout (compare.py): where and when it ran, the Markdown table of ratios with
numbered notes for every method that was wrong, refused, crashed or did not run, and the details."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from benchmarks.clip_methods import LABELS
from benchmarks.timing import print_table

ROOT = Path(__file__).resolve().parents[1]
ROWS = {"wide_mlp": "MLP 784-1024-1024-10", "transformer": "nn.TransformerEncoder d 256, 4 heads, 4 layers, T 64",
        "gpt2_d256": "GPT-2 (HF, 4 layers, d 256, T 64, tied)"}


def git(*args: str, cwd: Path = ROOT) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return "{:.1f}, {:.1f}, {:.1f} (1, 5, 15 min)".format(*os.getloadavg())
    except OSError:
        return "unknown"


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def fastdp_version(path: str | None) -> str:
    if not path:
        return "not given (--fastdp PATH)"
    found = re.search(r"__version__ = ['\"]([^'\"]+)", (Path(path) / "fastDP" / "__init__.py").read_text()) \
        if (Path(path) / "fastDP" / "__init__.py").is_file() else None
    commit = git("rev-parse", "--short", "HEAD", cwd=Path(path))
    return f"{found.group(1) if found else 'unknown version'} from {path}" + (f" (commit {commit})" if commit else "")


def environment(args, command: str) -> list[str]:
    """The lines above the table: date, machine, commit, command, the peers' versions, the load."""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " with uncommitted changes"
    device = args.device if args.device == "cpu" else f"{args.device} ({torch.cuda.get_device_name()})"
    return [f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            (f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{args.threads} torch thread(s), device {device}"),
            f"Commit: {commit}",
            f"Command: {command}",
            (f"Peers: opacus {version('opacus')}, transformers {version('transformers')}, "
             f"FastDP {fastdp_version(args.fastdp)}"),
            f"Load average at the start: {load_average()}"]


def clean(note: str, limit: int = 400) -> str:
    """A message on one Markdown line: no newlines, no table bars, at most `limit` characters."""
    text = " ".join(note.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def ratio(value: float) -> str:
    return f"{value:.2f}x" if value < 10 else f"{value:.1f}x" if value < 100 else f"{value:.0f}x"


def cell(outcome, notes: dict[str, int], memory: bool) -> str:
    """'1.05x, 1.10x' (time, memory), with a mark and a note number where the method failed."""
    mark = ""
    if outcome.note:
        number = notes.setdefault(outcome.note, len(notes) + 1)
        mark = f"[{number}]" if outcome.status == "ok" else f"not run [{number}]" if outcome.status == "not run" \
            else f"**{outcome.status}** [{number}]"
    if outcome.time_ratio is None:
        return mark
    numbers = ratio(outcome.time_ratio)
    if memory:
        numbers += ", " + (ratio(outcome.memory_ratio) if outcome.memory_ratio is not None else "memory not measured")
    return f"{numbers}, {mark}" if mark else numbers


def detail_rows(results: dict, methods: list[str]) -> list[dict]:
    rows = []
    for (kind, B), run in results.items():
        for name in ["plain", *methods]:
            o = run.outcomes[name]
            rows.append({"model": kind, "B": B, "seed": run.seed, "C": run.clip, "method": name,
                         "ms": "" if o.seconds is None else o.seconds * 1e3,
                         "x plain": "" if o.time_ratio is None else o.time_ratio,
                         "extra MB": "" if o.memory_mb is None else o.memory_mb,
                         "memory x plain": "" if o.memory_ratio is None else o.memory_ratio,
                         "rel. error": "" if o.error is None else f"{o.error:.1e}", "result": o.status})
    return rows


def print_report(header: list[str], results: dict, methods: list[str], memory: bool) -> None:
    """The header lines, the table (a row per model, a column per method), its notes, the details."""
    print("\n".join(header + [f"Load average at the end: {load_average()}", ""]))
    print("Each cell: " + ("time, extra peak memory" if memory else "time") + " of a clipped step as a ratio "
          "to a plain forward + backward in the same run (time: medians over interleaved rounds; memory: one "
          "step in a fresh process, exact storage count); **wrong**: the update differs from the float64 "
          "reference; **refuses** / **crash**: no update (the notes give the messages).\n")
    notes: dict[str, int] = {}
    columns = ["model", *(LABELS[m] for m in methods)]
    print("| " + " | ".join(columns) + " |")
    print("| " + " | ".join("---" for _ in columns) + " |")
    for (kind, B), run in results.items():
        cells = [cell(run.outcomes[m], notes, memory) for m in methods]
        print(f"| {ROWS.get(kind, kind)}, B {B} | " + " | ".join(cells) + " |")
    owners = {}
    for (kind, B), run in results.items():
        for m in methods:
            if run.outcomes[m].note:
                owners.setdefault(run.outcomes[m].note, []).append(f"{LABELS[m]} on {kind}")
    if notes:
        print()
    for note, number in notes.items():
        print(f"[{number}] {'; '.join(owners[note])}: {clean(note)}")
    redrawn = [f"{kind}: {why}" for (kind, B), run in results.items() for why in run.redrawn]
    if redrawn:
        print("\nBatches drawn again (a sample at a kink, where float32 and float64 take different branches and "
              "no reference exists):\n" + "\n".join(redrawn))
    print("\nDetails (seed: the batch's; C: the clip threshold, the median per-sample gradient norm; ms: median "
          "per step; rel. error: |update - reference| / |reference|):\n")
    print_table(detail_rows(results, methods), ["model", "B", "seed", "C", "method", "ms", "x plain", "extra MB",
                                                "memory x plain", "rel. error", "result"])

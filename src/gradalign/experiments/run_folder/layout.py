"""The run folder's layout: where each file of an experiment lives.

    <out>/config.json                      the resolved configuration and per-arm hashes
    <out>/study.db                         Optuna studies (default storage)
    <out>/tuning/[<variant>/]<arm>.json    best parameters and trial counts of each arm
    <out>/runs/[<variant>/]<arm>/seed<k>.csv   every evaluation of one final run
    <out>/runs/[<variant>/]<arm>/seed<k>.json  its summary (written last: marks the run finished)
    <out>/runs/[<variant>/]<arm>/seed<k>.npz   per-sample records, for methods that keep them
    <out>/clean/<variant>/<rule>/seed<k>.*     clean-and-retrain runs, the same files
    <out>/checkpoints/...                  the checkpoints of runs in progress
    <out>/tensorboard/...                  TensorBoard scalars of each run (with --tensorboard)
    <out>/evaluations.csv                  every evaluation of every final run
    <out>/summary.md, summary.json, *.png  the report
"""
from __future__ import annotations

from pathlib import Path


def cell(variant: str, arm: str) -> str:
    """'arm' or 'variant/arm': the key and relative folder of one arm of one variant."""
    return f"{variant}/{arm}" if variant else arm


def default_run_dir(name: str, quick: bool) -> Path:
    return Path("runs") / (name + ("-quick" if quick else ""))


def default_storage(run_dir: Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'study.db'}"


def run_path(run_dir: Path, variant: str, arm: str, seed: int) -> Path:
    """The summary JSON of one final run; its CSV is the same path with .csv."""
    return Path(run_dir) / "runs" / cell(variant, arm) / f"seed{seed}.json"


def tuning_path(run_dir: Path, variant: str, arm: str) -> Path:
    return Path(run_dir) / "tuning" / f"{cell(variant, arm)}.json"


def retrain_path(run_dir: Path, variant: str, rule: str, seed: int) -> Path:
    """The summary JSON of one clean-and-retrain run (its CSV: the same path with .csv)."""
    return Path(run_dir) / "clean" / cell(variant, rule) / f"seed{seed}.json"


def checkpoint_path(run_dir: Path, run: Path) -> Path:
    """The checkpoint folder of the run whose summary is `run`: runs/<cell>/seed<k>.json ->
    checkpoints/<cell>/seed<k>; clean/<cell>/seed<k>.json -> checkpoints/clean/<cell>/seed<k>."""
    parts = Path(run).relative_to(run_dir).with_suffix("").parts
    return Path(run_dir) / "checkpoints" / Path(*(parts[1:] if parts[0] == "runs" else parts))


def tensorboard_path(run_dir: Path, run: Path) -> Path:
    """The TensorBoard folder of the run whose summary is `run`, laid out as its checkpoint folder."""
    return Path(run_dir) / "tensorboard" / checkpoint_path(run_dir, run).relative_to(Path(run_dir) / "checkpoints")

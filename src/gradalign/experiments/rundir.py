"""The run folder: its layout, atomic writes, the evaluation columns, reading results back.

Layout::

    <out>/config.json                      the resolved configuration and per-arm hashes
    <out>/study.db                         Optuna studies (default storage)
    <out>/tuning/[<variant>/]<arm>.json    best parameters and trial counts of each arm
    <out>/runs/[<variant>/]<arm>/seed<k>.csv   every evaluation of one final run
    <out>/runs/[<variant>/]<arm>/seed<k>.json  its summary (written last: marks the run finished)
    <out>/evaluations.csv                  every evaluation of every final run
    <out>/summary.md, summary.json, *.png  the report (report.py, plots.py)

Every file is written to a temporary name and renamed, so an interrupted run never leaves
a half-written file. The runner writes, the report reads; neither imports the other.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

from gradalign.errors import ConfigError
from gradalign.experiments.arms import METHODS

log = logging.getLogger("gradalign")

_LEADING = ("arm", "seed", "epoch", "samples", "step", "train_loss", "train_acc", "val_loss", "val_acc",
            "test_loss", "test_acc", "gwa", "mean_alignment", "samples_per_step")
_TRAILING = ("lr", "wall_time")


def columns() -> tuple[str, ...]:
    """The columns of an evaluation row: shared ones, then every method's diagnostics."""
    return _LEADING + tuple(c for c in METHODS.columns() if c not in _LEADING + _TRAILING) + _TRAILING


def file_columns() -> tuple[str, ...]:
    """The columns of a run's CSV file and of evaluations.csv."""
    return ("variant",) + columns()


# ---------------------------------------------------------------- names and paths

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


# ---------------------------------------------------------------- writing

def write_atomic(path: Path, text: str) -> None:
    """Write text to path through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def rows_to_csv(rows: list[dict], cols) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(cols), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_run(path: Path, rows: list[dict], summary: dict) -> None:
    """A finished final run: its CSV, then its JSON (the JSON marks the run finished)."""
    write_atomic(path.with_suffix(".csv"), rows_to_csv(rows, file_columns()))
    write_json(path, summary)


def write_meta(run_dir: Path, config, storage: str, source: str, quick: bool) -> None:
    """config.json: the resolved configuration, the storage and every arm's hash."""
    hashes = {cell(v.variant, a.name): v.arm_hash(a) for v in config.variants() for a in v.arms}
    write_json(Path(run_dir) / "config.json", {"config": config.to_dict(), "source": source, "quick": quick,
                                               "storage": storage, "hashes": hashes,
                                               "variants": [v.variant for v in config.variants()]})


def check_folder(run_dir: Path, name: str) -> None:
    """Refuse a folder that holds another experiment's results."""
    meta = Path(run_dir) / "config.json"
    if meta.exists():
        try:
            old = json.loads(meta.read_text())["config"]["name"]
        except (OSError, KeyError, json.JSONDecodeError):
            return
        if old != name:
            raise ConfigError(f"{run_dir} holds results of experiment {old!r}, not {name!r}: "
                              "choose another --out folder")


# ---------------------------------------------------------------- reading

def _cell_value(v: str):
    """A CSV cell as int (seed, samples, step), float, or the text itself."""
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: _cell_value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def finished_run(path: Path, config_hash: str, params: dict) -> bool:
    """Whether the final run at `path` finished with this configuration and these parameters."""
    if not path.exists() or not path.with_suffix(".csv").exists():
        return False
    try:
        done = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if done.get("config_hash") != config_hash or done.get("tuned_params") != params:
        log.warning("%s was made with other settings; training it again", path)
        return False
    return True


def load_meta(run_dir: Path) -> dict:
    """config.json, brought up to the current format (older folders left [final] reference unset)."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise ConfigError(f"{run_dir} is not a run folder (no config.json); make one with `gradalign reproduce`")
    meta = json.loads(path.read_text())
    cfg = meta["config"]
    cfg["final"]["reference"] = cfg["final"]["reference"] or cfg["arms"][0]["name"]
    return meta


def load_runs(run_dir: Path) -> tuple[dict, dict]:
    """(meta, {variant: {arm: {seed: (summary, rows)}}}) for the runs of the current configuration."""
    run_dir = Path(run_dir)
    meta = load_meta(run_dir)
    runs: dict = {}
    for variant in meta["variants"]:
        runs[variant] = {}
        for arm in meta["config"]["arms"]:
            key = cell(variant, arm["name"])
            found = {}
            for path in sorted((run_dir / "runs" / key).glob("seed*.json")):
                summary = json.loads(path.read_text())
                if summary.get("config_hash") != meta["hashes"][key] or not path.with_suffix(".csv").exists():
                    continue
                found[summary["seed"]] = (summary, read_rows(path.with_suffix(".csv")))
            runs[variant][arm["name"]] = dict(sorted(found.items()))
    return meta, runs


def load_tuning(run_dir: Path) -> dict:
    """{'[variant/]arm': the tuning record} of every tuned arm."""
    root = Path(run_dir) / "tuning"
    if not root.exists():
        return {}
    return {str(p.relative_to(root).with_suffix("")): json.loads(p.read_text()) for p in sorted(root.rglob("*.json"))}

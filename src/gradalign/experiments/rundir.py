"""The run folder: its layout, atomic writes, the evaluation columns, reading results back.

Layout::

    <out>/config.json                      the resolved configuration and per-arm hashes
    <out>/study.db                         Optuna studies (default storage)
    <out>/tuning/[<variant>/]<arm>.json    best parameters and trial counts of each arm
    <out>/runs/[<variant>/]<arm>/seed<k>.csv   every evaluation of one final run
    <out>/runs/[<variant>/]<arm>/seed<k>.json  its summary (written last: marks the run finished)
    <out>/runs/[<variant>/]<arm>/seed<k>.npz   per-sample records, for methods that keep them (signals.py)
    <out>/clean/<variant>/<rule>/seed<k>.*     clean-and-retrain runs (clean.py), the same files
    <out>/evaluations.csv                  every evaluation of every final run
    <out>/summary.md, summary.json, *.png  the report (report.py, plots.py)

Every file is written to a temporary name and renamed, so an interrupted run never leaves
a half-written file. A final run counts as finished only when its CSV agrees with its JSON
(the last evaluation and the number of evaluations). `lock` keeps two processes from
training into one folder. The runner writes, the report reads; neither imports the other.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import socket
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from gradalign.errors import ConfigError, RunFolderError
from gradalign.experiments.arms import METHODS

try:
    import fcntl
except ImportError:  # pragma: no cover  (Windows: no advisory locks, folders are not locked)
    fcntl = None

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


def write_npz(path: Path, arrays: dict) -> None:
    """Write arrays to a compressed .npz through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_npz(path: Path) -> dict:
    """The arrays of a .npz; RunFolderError when it is missing or damaged."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise RunFolderError(f"{path} is missing") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise RunFolderError(f"{path} is damaged ({e})") from None


def check_npz(path: Path) -> None:
    """RunFolderError unless `path` is a whole .npz (every member present, CRCs intact)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except FileNotFoundError:
        raise RunFolderError(f"{path} is missing") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise RunFolderError(f"{path} is damaged ({e})") from None
    if bad is not None:
        raise RunFolderError(f"{path} is damaged (member {bad} fails its CRC)")


def write_run(path: Path, rows: list[dict], summary: dict, records: dict | None = None) -> None:
    """A finished final run: its records (.npz, when the step keeps any), its CSV, then its
    JSON (the JSON marks the run finished, records how many evaluations the CSV holds and
    names the .npz)."""
    if records:
        write_npz(path.with_suffix(".npz"), records)
        summary = {**summary, "records": path.with_suffix(".npz").name}
    write_atomic(path.with_suffix(".csv"), rows_to_csv(rows, file_columns()))
    write_json(path, {**summary, "evaluations": len(rows)})


def write_meta(run_dir: Path, config, storage: str, source: str, quick: bool) -> None:
    """config.json: the resolved configuration, the storage and every arm's hash."""
    hashes = {cell(v.variant, a.name): v.arm_hash(a) for v in config.variants() for a in v.arms}
    write_json(Path(run_dir) / "config.json", {"config": config.to_dict(), "source": source, "quick": quick,
                                               "storage": storage, "hashes": hashes,
                                               "variants": [v.variant for v in config.variants()]})


def prepare_folder(run_dir: Path, name: str) -> None:
    """Create the run folder, or refuse one that is a file, unwritable, or another experiment's."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file, not a folder: choose a folder for the results")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the run folder {run_dir} ({e.strerror}): choose another --out") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"the run folder {run_dir} is not writable: choose another --out or fix its permissions")
    meta = Path(run_dir) / "config.json"
    if meta.exists():
        try:
            old = json.loads(meta.read_text())["config"]["name"]
        except (OSError, KeyError, json.JSONDecodeError):
            return
        if old != name:
            raise ConfigError(f"{run_dir} holds results of experiment {old!r}, not {name!r}: "
                              "choose another --out folder")


@contextlib.contextmanager
def lock(run_dir: Path, *, exclusive: bool):
    """Hold the folder's advisory lock (<run_dir>/.lock) for the duration.

    exclusive (reproduce): the only process training into the folder; shared (tune): any
    number of tuning workers, none while a reproduce holds it. The lock is the kernel's
    (flock), so a killed process releases it; it does not span machines on NFS: give each
    machine its own --out and share the studies through --storage.
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    path = Path(run_dir) / ".lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another gradalign process (e.g. `gradalign tune`)"
            raise RunFolderError(f"the run folder {run_dir} is in use by {holder}: wait for it to finish, "
                                 "or choose another --out") from None
        if exclusive:
            f.seek(0)
            f.truncate()
            f.write(f"`{' '.join(['gradalign'] + sys.argv[1:])}` (pid {os.getpid()} on {socket.gethostname()}, "
                    f"since {time.strftime('%Y-%m-%d %H:%M:%S')})")
            f.flush()
        try:
            yield
        finally:
            if exclusive:
                f.seek(0)
                f.truncate()
                f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)


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
    """The evaluation rows of a CSV; RunFolderError when a line is cut or the file is empty."""
    text = Path(path).read_text()
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    if not rows or not text.endswith("\n") or any(None in row.values() or None in row for row in rows):
        raise RunFolderError(f"{path} is damaged ({'no evaluations' if not rows else 'a line is cut short'})")
    return [{k: _cell_value(v) for k, v in row.items()} for row in rows]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise RunFolderError(f"{path} is damaged (not valid JSON: {e.msg} at line {e.lineno})") from None


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def read_run(path: Path) -> tuple[dict, list[dict]]:
    """(summary, rows) of a final run, checked against each other: the CSV must hold the
    evaluations the JSON says and end with its final values (a CSV cut at a line boundary
    would otherwise pass for a shorter run). RunFolderError when they disagree."""
    summary, rows = _read_json(path), read_rows(path.with_suffix(".csv"))
    last, final = rows[-1], summary.get("final", {})
    expected = summary.get("evaluations", len(rows))          # folders made before 0.2 lack the count
    if len(rows) != expected or last.get("samples") != summary.get("samples") or \
            not all(_same(last.get(k), v) for k, v in final.items()):
        raise RunFolderError(f"{path.with_suffix('.csv')} does not match {path.name}: it holds {len(rows)} "
                             f"evaluations ending at {last.get('samples')} samples, the run ended at "
                             f"{summary.get('samples')} samples after {expected}")
    if summary.get("records"):
        check_npz(path.with_name(summary["records"]))
    return summary, rows


def finished_run(path: Path, config_hash: str, params: dict) -> bool:
    """Whether the final run at `path` finished with this configuration and these parameters
    (a damaged or mismatched run is not finished: it is trained again)."""
    if not path.exists() or not path.with_suffix(".csv").exists():
        return False
    try:
        done, _ = read_run(path)
    except (OSError, RunFolderError) as e:
        log.warning("%s; training it again", e)
        return False
    if done.get("config_hash") != config_hash or done.get("tuned_params") != params:
        log.warning("%s was made with other settings; training it again", path)
        return False
    return True


def load_meta(run_dir: Path) -> dict:
    """config.json, brought up to the current format (older folders left [final] reference unset)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise RunFolderError(f"{run_dir} is not a run folder (no config.json); make one with `gradalign reproduce`")
    meta = _read_json(path)
    cfg = meta.get("config") if isinstance(meta, dict) else None
    missing = ["config"] if not isinstance(cfg, dict) else (
        [k for k in ("hashes", "variants") if k not in meta] + [k for k in ("arms", "final", "experiment") if k not in cfg])
    if missing or not cfg["arms"]:
        raise RunFolderError(f"{path} is damaged (no {', '.join(missing) or 'arms'}): run `gradalign reproduce` "
                             "with the same --out to write it again")
    cfg["final"]["reference"] = cfg["final"].get("reference") or cfg["arms"][0]["name"]
    return meta


def load_runs(run_dir: Path) -> tuple[dict, dict]:
    """(meta, {variant: {arm: {seed: (summary, rows)}}}) for the runs of the current configuration.

    Damaged files and seeds of one arm trained with different parameters raise RunFolderError
    (one line: the file or the seeds, and what to do)."""
    run_dir = Path(run_dir)
    meta = load_meta(run_dir)
    runs: dict = {}
    fix = "run `gradalign reproduce` with the same --out to train it again (or delete it)"
    for variant in meta["variants"]:
        runs[variant] = {}
        for arm in meta["config"]["arms"]:
            key = cell(variant, arm["name"])
            found = {}
            for path in sorted((run_dir / "runs" / key).glob("seed*.json")):
                if not path.with_suffix(".csv").exists():
                    continue
                try:
                    summary, rows = read_run(path)
                except RunFolderError as e:
                    raise RunFolderError(f"{e}: {fix}") from None
                if summary.get("config_hash") == meta["hashes"][key]:
                    found[summary["seed"]] = (summary, rows)
            _check_same_params(key, found)
            runs[variant][arm["name"]] = dict(sorted(found.items()))
    return meta, runs


def _check_same_params(key: str, found: dict) -> None:
    """Seeds of one arm must share their parameters, or their mean describes no single setting."""
    groups: dict[str, list[int]] = {}
    for seed, (summary, _) in found.items():
        groups.setdefault(json.dumps(summary.get("params"), sort_keys=True), []).append(seed)
    if len(groups) > 1:
        described = "; ".join(f"seeds {', '.join(map(str, seeds))}: {params}" for params, seeds in groups.items())
        raise RunFolderError(f"arm {key!r} has seeds trained with different parameters ({described}): run "
                             "`gradalign reproduce` with the same --out, which trains every seed with the "
                             "current best parameters")


def load_tuning(run_dir: Path) -> dict:
    """{'[variant/]arm': the tuning record} of every tuned arm."""
    root = Path(run_dir) / "tuning"
    if not root.exists():
        return {}
    return {str(p.relative_to(root).with_suffix("")): json.loads(p.read_text()) for p in sorted(root.rglob("*.json"))}

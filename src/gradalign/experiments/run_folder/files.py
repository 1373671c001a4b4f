"""Writing the run folder: every file goes to a temporary name and is renamed, so an interrupted
run never leaves a half-written file. A final run is written as records (.npz), CSV, then JSON
(the JSON marks it finished and says how many evaluations the CSV holds)."""
from __future__ import annotations

import csv
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from gradalign.errors import RunFolderError
from gradalign.experiments.run_folder.layout import cell


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


def write_run(path: Path, rows: list[dict], summary: dict, records: dict | None = None, *, columns) -> None:
    """A finished final run: its records (.npz, when the step keeps any), its CSV (`columns`:
    the method table's file_columns()), then its JSON (the JSON marks the run finished, records
    how many evaluations the CSV holds and names the .npz)."""
    if records:
        write_npz(path.with_suffix(".npz"), records)
        summary = {**summary, "records": path.with_suffix(".npz").name}
    write_atomic(path.with_suffix(".csv"), rows_to_csv(rows, columns))
    write_json(path, {**summary, "evaluations": len(rows)})


def write_meta(run_dir: Path, config, storage: str, source: str, quick: bool) -> None:
    """config.json: the resolved configuration, the storage and every arm's hash."""
    hashes = {cell(v.variant, a.name): v.arm_hash(a) for v in config.variants() for a in v.arms}
    write_json(Path(run_dir) / "config.json", {"config": config.to_dict(), "source": source, "quick": quick,
                                               "storage": storage, "hashes": hashes,
                                               "variants": [v.variant for v in config.variants()]})

"""Reading the run folder back: a final run counts as finished only when its CSV agrees with
its JSON (the last evaluation and the number of evaluations); damaged files raise
RunFolderError naming the file and what to do. The runner writes, the report reads; neither
imports the other."""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from pathlib import Path

from gradalign.errors import RunFolderError
from gradalign.experiments.label_noise.dropping import drop_rules
from gradalign.experiments.run_folder.files import check_npz
from gradalign.experiments.run_folder.layout import cell

log = logging.getLogger("gradalign")


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


def read_json(path: Path) -> dict:
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
    summary, rows = read_json(path), read_rows(path.with_suffix(".csv"))
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
    meta = read_json(path)
    cfg = meta.get("config") if isinstance(meta, dict) else None
    missing = ["config"] if not isinstance(cfg, dict) else (
        [k for k in ("hashes", "variants") if k not in meta] + [k for k in ("arms", "final", "experiment") if k not in cfg])
    if missing or not cfg["arms"]:
        raise RunFolderError(f"{path} is damaged (no {', '.join(missing) or 'arms'}): run `gradalign reproduce` "
                             "with the same --out to write it again")
    cfg["final"]["reference"] = cfg["final"].get("reference") or cfg["arms"][0]["name"]
    _check_names(path, meta)
    return meta


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def _check_names(path: Path, meta: dict) -> None:
    """Names that become file and folder names (variants, arms) must be plain names: no '..', no
    separators, so a config.json written by hand cannot make the report read or write elsewhere."""
    cfg = meta["config"]
    names = [("variant", v) for v in meta["variants"] if v != ""] + [("arm", a.get("name")) for a in cfg["arms"]]
    noise = cfg.get("noise") or {}
    names += [("[noise] signals_arm", noise["signals_arm"])] if noise.get("signals_arm") is not None else []
    for kind, name in names:
        if not (isinstance(name, str) and _NAME.fullmatch(name) and ".." not in name):
            raise RunFolderError(f"{path} is damaged: the {kind} name {name!r} is not a plain name (letters, digits, "
                                 "_ . -): run `gradalign reproduce` with the same --out to write it again")


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


def load_retrained(run_dir: Path, meta: dict, variant: str, sources: dict) -> dict:
    """{rule name: {seed: summary}} of the clean-and-retrain runs made from the current signals
    arm's runs `sources` ({seed: summary}: same settings hash and tuned parameters)."""
    noise_cfg = meta["config"].get("noise") or {}
    arm = noise_cfg.get("signals_arm")
    if arm is None:
        return {}
    source_hash = meta["hashes"].get(cell(variant, arm))
    out = {}
    for rule in drop_rules(noise_cfg):
        found = {}
        for path in sorted((Path(run_dir) / "clean" / cell(variant, rule.name)).glob("seed*.json")):
            if not path.with_suffix(".csv").exists():
                continue
            try:
                summary, _ = read_run(path)
            except RunFolderError as e:
                raise RunFolderError(f"{e}: run `gradalign reproduce` with the same --out to train it again "
                                     "(or delete it)") from None
            seed = summary.get("seed")
            if summary.get("source_hash") == source_hash and seed in sources and \
                    summary.get("tuned_params") == sources[seed].get("tuned_params"):
                found[seed] = summary
        if found:
            out[rule.name] = dict(sorted(found.items()))
    return out

"""Run an experiment end to end: tune every arm, train every arm on every seed, report.

Run folder layout::

    <out>/config.json                      the resolved configuration and per-arm hashes
    <out>/study.db                         Optuna studies (default storage)
    <out>/tuning/[<variant>/]<arm>.json    best parameters and trial counts of each arm
    <out>/runs/[<variant>/]<arm>/seed<k>.csv   every evaluation of one final run
    <out>/runs/[<variant>/]<arm>/seed<k>.json  its summary (written last: marks the run finished)
    <out>/evaluations.csv                  every evaluation of every final run
    <out>/summary.md, summary.json, *.png  the report (report.py)

Every file is written to a temporary name and renamed, so an interrupted run never leaves
a half-written result. A re-run with the same folder skips finished trials (tune.py) and
finished runs: a run is finished when its .json exists with the same configuration hash
and the same parameters; otherwise (configuration changed, more trials moved the best
parameters) it is trained again.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from gradalign.errors import ConfigError
from gradalign.experiments import data as data_mod
from gradalign.experiments.config import ArmConfig, ExperimentConfig, check_params, load_config
from gradalign.experiments.train import COLUMNS, train_run
from gradalign.experiments.tune import TuneResult, count_finished, open_study, tune_arm

log = logging.getLogger("gradalign")


# ---------------------------------------------------------------- files

def write_atomic(path: Path, text: str) -> None:
    """Write text to path through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def rows_to_csv(rows: list[dict], columns) -> str:
    import io
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def cell(config: ExperimentConfig, arm: ArmConfig | str) -> str:
    """'arm' or 'variant/arm': the key and relative folder of one arm of one variant."""
    name = arm if isinstance(arm, str) else arm.name
    return f"{config.variant}/{name}" if config.variant else name


def run_path(run_dir: Path, config: ExperimentConfig, arm: ArmConfig, seed: int) -> Path:
    return Path(run_dir) / "runs" / cell(config, arm) / f"seed{seed}.json"


def tuning_path(run_dir: Path, config: ExperimentConfig, arm: ArmConfig) -> Path:
    return Path(run_dir) / "tuning" / f"{cell(config, arm)}.json"


def default_storage(run_dir: Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'study.db'}"


def _finished_run(path: Path, config_hash: str, params: dict) -> bool:
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


# ---------------------------------------------------------------- the experiment

@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run with n torch CPU threads, then restore the previous number."""
    import torch
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def resolve(name_or_path, *, quick: bool = False, trials: int | None = None, seeds: int | None = None,
            overrides: dict | None = None) -> ExperimentConfig:
    """Load a config with --quick, --trials, --seeds and --set applied (validated together)."""
    over = dict(overrides or {})
    if trials is not None:
        over["tune.trials"] = trials
    if seeds is not None:
        over["final.seeds"] = seeds
    return load_config(name_or_path, quick=quick, overrides=over)


def _check_folder(run_dir: Path, config: ExperimentConfig) -> None:
    meta = run_dir / "config.json"
    if meta.exists():
        try:
            old = json.loads(meta.read_text())["config"]["name"]
        except (OSError, KeyError, json.JSONDecodeError):
            return
        if old != config.name:
            raise ConfigError(f"{run_dir} holds results of experiment {old!r}, not {config.name!r}: "
                              "choose another --out folder")


def _write_meta(run_dir: Path, config: ExperimentConfig, storage: str, source: str, quick: bool) -> None:
    hashes = {cell(v, a): v.arm_hash(a) for v in config.variants() for a in v.arms}
    write_json(run_dir / "config.json", {"config": config.to_dict(), "source": source, "quick": quick,
                                         "storage": storage, "hashes": hashes,
                                         "variants": [v.variant for v in config.variants()]})


class _Bars:
    """One bar for the experiment (trials + runs), one for the current run (samples)."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str):
        self.enabled = enabled
        self.outer = tqdm(total=total, initial=initial, desc=desc, unit="job", position=0,
                          disable=not enabled, dynamic_ncols=True)

    def inner(self, desc: str, total: int):
        return tqdm(total=total, desc=desc, unit="sample", unit_scale=True, position=1, leave=False,
                    disable=not self.enabled, dynamic_ncols=True)

    def tick(self, *_):
        self.outer.update(1)

    def close(self):
        self.outer.close()


def reproduce(name_or_path, out_dir: str | Path | None = None, *, quick: bool = False, trials: int | None = None,
              seeds: int | None = None, storage: str | None = None, overrides: dict | None = None,
              progress: bool = True, report: bool = True, threads: int | None = 1) -> Path:
    """Tune every arm, train every arm on every seed, then write the report. Resumable.

    Args:
        name_or_path: a bundled experiment ("gasw", "gaga", "gwa", "gvr", "demo") or a TOML path.
        out_dir: the run folder (default ``runs/<name>`` or ``runs/<name>-quick``).
        quick: apply the config's [quick] tables (fewer trials, seeds and samples).
        trials, seeds: override [tune] trials and [final] seeds.
        storage: an Optuna storage URL (default sqlite:///<out_dir>/study.db).
        overrides: dotted keys to set, e.g. {"train.epochs": 2}.
        progress: show progress bars.
        report: write the report at the end.
        threads: torch CPU threads while running (default 1: these small models gain nothing from
            more, and one thread per process stays fast when other processes share the cores);
            None leaves torch's setting alone.
    Returns:
        The run folder.
    """
    config = resolve(name_or_path, quick=quick, trials=trials, seeds=seeds, overrides=overrides)
    run_dir = Path(out_dir) if out_dir is not None else Path("runs") / (config.name + ("-quick" if quick else ""))
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_folder(run_dir, config)
    storage = storage or default_storage(run_dir)
    _write_meta(run_dir, config, storage, str(name_or_path), quick)
    log.info("experiment %s: results in %s (Optuna storage %s)", config.name, run_dir.resolve(), storage)
    variants = config.variants()
    seed_list = [config.final.first_seed + k for k in range(config.final.seeds)]
    total, done = _plan(run_dir, variants, seed_list, storage)
    bars = _Bars(progress, total, done, config.name)
    t0 = time.perf_counter()
    try:
        with torch_threads(threads):
            for v in variants:
                _run_variant(run_dir, v, seed_list, storage, bars)
    finally:
        bars.close()
    log.info("all runs finished in %.0f s", time.perf_counter() - t0)
    if report:
        from gradalign.experiments.report import write_report
        write_report(run_dir)
    return run_dir


def _plan(run_dir: Path, variants, seed_list, storage) -> tuple[int, int]:
    """Total jobs (trials + runs) and how many are already done, for the outer bar."""
    total = done = 0
    for v in variants:
        for arm in v.arms:
            if arm.search and v.tune.trials:
                total += v.tune.trials
                done += min(count_finished(open_study(v, arm, storage)), v.tune.trials)
            total += len(seed_list)
            done += sum(run_path(run_dir, v, arm, s).exists() for s in seed_list)
    return total, min(done, total)


def _run_variant(run_dir: Path, config: ExperimentConfig, seed_list: list[int], storage: str, bars: _Bars) -> None:
    label = f"{config.name}" + (f" [{config.variant}]" if config.variant else "")
    log.info("%s: generating mnist1d (%d samples, label noise %g)", label, config.data.num_samples,
             config.data.label_noise)
    d = config.data
    splits = data_mod.make_mnist1d(d.num_samples, d.seed, val_fraction=d.val_fraction,
                                   label_noise=d.label_noise, noise_seed=d.noise_seed)
    tuned: dict[str, TuneResult] = {}
    for arm in config.arms:
        result = tune_arm(config, arm, splits, storage=storage, on_trial=bars.tick, progress_factory=bars.inner)
        tuned[arm.name] = result
        if arm.search and config.tune.trials:
            write_json(tuning_path(run_dir, config, arm), {**result.to_dict(), "storage": storage})
            log.info("%s %s: best %s (val acc %.4f) after %d complete, %d pruned, %d diverged trials",
                     label, arm.name, _fmt(result.params), result.value, result.complete, result.pruned,
                     result.failed)
    for seed in seed_list:                          # seed-major: an interruption leaves complete pairs
        for arm in config.arms:
            path = run_path(run_dir, config, arm, seed)
            params = tuned[arm.name].params
            if _finished_run(path, config.arm_hash(arm), params):
                continue
            bar = bars.inner(f"{arm.name} seed {seed}", config.train.budget(len(getattr(splits, arm.train_split))))
            try:
                result = train_run(config, arm, params, seed, splits, eval_split="test", progress=bar)
            finally:
                bar.close()
            for row in result.rows:
                row["variant"] = config.variant
            write_atomic(path.with_suffix(".csv"), rows_to_csv(result.rows, ("variant",) + COLUMNS))
            write_json(path, {**result.summary, "variant": config.variant, "config_hash": config.arm_hash(arm),
                              "tuned_params": params, "label": arm.title})
            last = result.rows[-1]
            log.info("%s %s seed %d: test acc %.4f, train loss %.4f (%.0f s) -> %s", label, arm.name, seed,
                     last["test_acc"], last["train_loss"], result.summary["wall_time"], path.with_suffix(".csv"))
            bars.tick()


def _fmt(params: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items()) or "-"


def run_single(name_or_path, arm_name: str, params: dict, seed: int, *, quick: bool = False,
               overrides: dict | None = None, eval_split: str = "test", progress: bool = True,
               threads: int | None = 1):
    """Train one arm once with given parameters (the `gradalign train` command)."""
    config = resolve(name_or_path, quick=quick, overrides=overrides)   # noise: [data] label_noise
    arm = config.arm(arm_name)
    check_params(arm, params)
    d = config.data
    splits = data_mod.make_mnist1d(d.num_samples, d.seed, val_fraction=d.val_fraction,
                                   label_noise=d.label_noise, noise_seed=d.noise_seed)
    n = len(splits.train if eval_split == "val" else getattr(splits, arm.train_split))
    with tqdm(total=config.train.budget(n), desc=f"{arm.name} seed {seed}", unit="sample", unit_scale=True,
              disable=not progress, leave=False) as bar, torch_threads(threads):
        return train_run(config, arm, params, seed, splits, eval_split=eval_split, progress=bar)


__all__ = ["reproduce", "run_single", "resolve", "cell", "run_path", "tuning_path", "write_atomic",
           "write_json", "rows_to_csv", "default_storage"]

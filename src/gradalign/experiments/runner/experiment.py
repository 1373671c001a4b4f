"""Run an experiment end to end: tune every arm, train every arm on every seed, report.

    reproduce("gasw", quick=True)   -> Reproduced(run_dir, summary)   # `gradalign reproduce`, `demo`
    tune_only("gaga", arms=["gaga"]) -> {cell: best parameters}        # `gradalign tune`
    run_single("gasw", "gasw", {"lr": 3e-3}, seed=0) -> RunResult     # `gradalign train`

The run folder's layout and files are run_folder.py's. A re-run with the same folder skips
finished trials (tune.py) and finished runs: a run is finished when its .json exists with
the same configuration hash and the same parameters; otherwise (configuration changed,
more trials moved the best parameters) it is trained again. A final run in progress is
checkpointed after every evaluation (``checkpoints/[<variant>/]<arm>/seed<k>/``, final_runs.py)
and resumes from there; the checkpoint is removed once the run is written.

Data: ``data_dir`` is where CIFAR archives are read from (data/cifar.py); they are read, and a
missing or malformed archive refused, before anything is written. ``device``: "auto"
(a GPU when there is one, for CIFAR; the CPU for mnist1d), "cpu" or "cuda" (training/device.py).
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from gradalign.errors import ConfigError
from gradalign.experiments import run_folder
from gradalign.experiments.config import ExperimentConfig, check_params, load_config
from gradalign.experiments.data import load_splits
from gradalign.experiments.report import write_report
from gradalign.experiments.runner.progress import Bars, label, unit
from gradalign.experiments.runner.retrain import planned
from gradalign.experiments.runner.variants import run_variant, tune_variant
from gradalign.experiments.training import RunResult, resolve_device, train_run
from gradalign.experiments.training.tensorboard import ScalarLog
from gradalign.experiments.training.tensorboard import check_installed as check_tensorboard
from gradalign.experiments.tuning import DEFAULT_HEARTBEAT, count_finished, open_study
from gradalign.experiments.tuning.storage import check_storage, masked

log = logging.getLogger("gradalign")


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


@dataclass
class Reproduced:
    run_dir: Path
    summary: dict | None   # the report (report.write_report), None when report=False


def _folder(config: ExperimentConfig, out_dir, quick: bool) -> Path:
    run_dir = Path(out_dir) if out_dir is not None else run_folder.default_run_dir(config.name, quick)
    run_folder.prepare_folder(run_dir, config.name)
    return run_dir


def _start(run_dir: Path, config: ExperimentConfig, quick: bool, storage: str | None, source: str) -> str:
    """Write config.json (under the folder's lock; the storage's password masked) and return the storage URL."""
    storage = storage or run_folder.default_storage(run_dir)
    run_folder.write_meta(run_dir, config, masked(storage), source, quick)
    return storage


def reproduce(name_or_path, out_dir: str | Path | None = None, *, quick: bool = False, trials: int | None = None,
              seeds: int | None = None, storage: str | None = None, overrides: dict | None = None,
              progress: bool = True, report: bool = True, threads: int | None = 1,
              heartbeat: int | None = DEFAULT_HEARTBEAT, data_dir=None, device="auto",
              tensorboard: bool = False) -> Reproduced:
    """Tune every arm, train every arm on every seed, then write the report. Resumable.

    Args:
        name_or_path: a bundled experiment ("gasw", "gaga", "gwa", "gvr", "noise", "demo") or a TOML path.
        out_dir: the run folder (default ``runs/<name>`` or ``runs/<name>-quick``).
        quick: apply the config's [quick] tables (fewer trials, seeds and samples).
        trials, seeds: override [tune] trials and [final] seeds.
        storage: an Optuna storage URL (default sqlite:///<out_dir>/study.db); tuning/storage.py.
        heartbeat: seconds between a worker's heartbeats on database storages (a trial of a
            worker silent for twice this is failed and retried).
        overrides: dotted keys to set, e.g. {"train.epochs": 2}.
        progress: show progress bars.
        report: write the report at the end (and return its summary).
        threads: torch CPU threads while running (default 1: these small models gain nothing from
            more, and one thread per process stays fast when other processes share the cores);
            None leaves torch's setting alone.
        data_dir: the folder with the CIFAR archives (default ./data); unused for mnist1d.
        device: "auto", "cpu", "cuda" or "cuda:N".
        tensorboard: also write each final run's evaluations as TensorBoard scalars under
            <out>/tensorboard/ (needs the tensorboard package).
    """
    config = resolve(name_or_path, quick=quick, trials=trials, seeds=seeds, overrides=overrides)
    if tensorboard:
        check_tensorboard()
    dev = _check_inputs(config, data_dir, device, storage, heartbeat)
    run_dir = _folder(config, out_dir, quick)
    with run_folder.lock(run_dir, exclusive=True):
        storage = _start(run_dir, config, quick, storage, str(name_or_path))
        log.info("experiment %s: results in %s (Optuna storage %s)", config.name, run_dir.resolve(), masked(storage))
        variants = config.variants()
        seed_list = [config.final.first_seed + k for k in range(config.final.seeds)]
        total, done = _plan(run_dir, variants, seed_list, storage)
        bars = Bars(progress, total, done, config.name)
        t0 = time.perf_counter()
        try:
            with torch_threads(threads):
                for v in variants:
                    run_variant(run_dir, v, seed_list, storage, bars, heartbeat, data_dir, dev, tensorboard)
        finally:
            bars.close()
        log.info("all runs finished in %.0f s", time.perf_counter() - t0)
        return Reproduced(run_dir, write_report(run_dir) if report else None)


def _check_inputs(config: ExperimentConfig, data_dir, device, storage: str | None = None,
                  heartbeat: int | None = DEFAULT_HEARTBEAT):
    """The device, after reading every variant's data once (cached) and opening the storage, so
    that missing CIFAR archives, a missing GPU or a bad storage URL are refused before the run
    folder is touched."""
    if storage is not None:
        check_storage(storage, heartbeat)
    dev = resolve_device(device, small=all(v.data.dataset == "mnist1d" for v in config.variants()))
    for v in config.variants():
        if v.data.dataset != "mnist1d":
            load_splits(v.data, data_dir)
    return dev


def _plan(run_dir: Path, variants, seed_list, storage) -> tuple[int, int]:
    """Total jobs (trials + runs) and how many are already done, for the outer bar."""
    total = done = 0
    for v in variants:
        for arm in v.arms:
            if arm.search and v.tune.trials:
                total += v.tune.trials
                done += min(count_finished(open_study(v, arm, storage)), v.tune.trials)
            total += len(seed_list)
            done += sum(run_folder.run_path(run_dir, v.variant, arm.name, s).exists() for s in seed_list)
        retrain, retrained = planned(run_dir, v, seed_list)
        total, done = total + retrain, done + retrained
    return total, min(done, total)


def tune_only(name_or_path, out_dir: str | Path | None = None, *, arms: list[str] | None = None,
              quick: bool = False, trials: int | None = None, storage: str | None = None,
              overrides: dict | None = None, progress: bool = True, threads: int | None = 1,
              heartbeat: int | None = DEFAULT_HEARTBEAT, data_dir=None, device="auto") -> tuple[Path, str, dict]:
    """Tune arms only (default: every arm with a search table); returns (run folder, storage URL with
    its password masked, {'[variant/]arm': TuneResult.to_dict()}) and writes them to <out>/tuning.json."""
    config = resolve(name_or_path, quick=quick, trials=trials, overrides=overrides)
    names = arms or [a.name for a in config.arms if a.search]
    for name in names:
        config.arm(name)                                   # unknown arm: ConfigError before any work
    if not names:
        raise ConfigError(f"experiment {config.name!r} searches nothing: no arm has a search table")
    dev = _check_inputs(config, data_dir, device, storage, heartbeat)
    run_dir = _folder(config, out_dir, quick)
    results = {}
    with run_folder.lock(run_dir, exclusive=False), torch_threads(threads):   # tuning workers may share a folder
        storage = _start(run_dir, config, quick, storage, str(name_or_path))
        for variant in config.variants():
            splits = load_splits(variant.data, data_dir).to(dev)
            bars = Bars(progress, variant.tune.trials * len(names), 0, f"tune {label(variant)}")
            try:
                tuned = tune_variant(variant, [variant.arm(n) for n in names], splits, storage, bars, heartbeat, dev)
            finally:
                bars.close()
            results.update({run_folder.cell(variant.variant, n): r.to_dict() for n, r in tuned.items()})
        run_folder.write_json(run_dir / "tuning.json", {"storage": masked(storage), "arms": results})
    return run_dir, masked(storage), results


def run_single(name_or_path, arm_name: str, params: dict, seed: int, *, quick: bool = False,
               overrides: dict | None = None, eval_split: str = "test", progress: bool = True,
               threads: int | None = 1, parallel=None, data_dir=None, device="auto",
               tensorboard: str | Path | None = None) -> RunResult:
    """Train one arm once with given parameters (the `gradalign train` command; the first
    variant's data, model and budget when the experiment has [variants]); `parallel`
    (training/parallel.py): data parallel, this process's rank; `tensorboard`: a folder for the
    evaluations' TensorBoard scalars (rank 0 writes)."""
    config = resolve(name_or_path, quick=quick, overrides=overrides)    # noise: [data] label_noise
    config = config.variant_configs[0] if config.variant_configs else config
    arm = config.arm(arm_name)
    check_params(arm, params)
    dev = resolve_device(device, small=config.data.dataset == "mnist1d")
    scalars = ScalarLog(tensorboard) if tensorboard is not None and (parallel is None or parallel.rank == 0) else None
    splits = load_splits(config.data, data_dir)
    n = len(splits.train if eval_split == "val" else getattr(splits, arm.train_split))
    with tqdm(total=config.train.budget(n), desc=f"{arm.name} seed {seed}", unit=unit(config), unit_scale=True,
              disable=not progress, leave=False) as bar, torch_threads(threads):
        try:
            return train_run(config, arm, params, seed, splits, eval_split=eval_split, progress=bar, device=dev,
                             parallel=parallel, on_eval=scalars)
        finally:
            if scalars is not None:
                scalars.close()

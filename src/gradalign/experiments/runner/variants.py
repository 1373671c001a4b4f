"""One sub-experiment (a variant) end to end: tune its arms, train each arm on each seed
(seed-major, so an interruption leaves complete pairs), then clean-and-retrain."""
from __future__ import annotations

import logging
from pathlib import Path

from gradalign.experiments import run_folder
from gradalign.experiments.config import ExperimentConfig
from gradalign.experiments.data import load_splits
from gradalign.experiments.runner.final_runs import FinalRun, checkpoint_of, train_final
from gradalign.experiments.runner.progress import Bars, label, unit
from gradalign.experiments.runner.retrain import retrain_variant
from gradalign.experiments.training import run_key
from gradalign.experiments.tuning import DEFAULT_HEARTBEAT, TuneResult, tune_arm
from gradalign.experiments.tuning.storage import masked

log = logging.getLogger("gradalign")


def format_params(params: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items()) or "-"


def tune_variant(config: ExperimentConfig, arms, splits, storage: str, bars: Bars,
                  heartbeat: int | None = DEFAULT_HEARTBEAT, device="cpu") -> dict[str, TuneResult]:
    """Tune the given arms of one variant (untuned arms give empty parameters)."""
    tuned = {}
    for arm in arms:
        result = tune_arm(config, arm, splits, storage=storage, on_trial=bars.tick, heartbeat=heartbeat,
                          device=device, progress_factory=lambda desc, total: bars.inner(desc, total, unit(config)))
        tuned[arm.name] = result
        if arm.search and config.tune.trials:
            log.info("%s %s: best %s (val acc %.4f) after %d complete, %d pruned, %d diverged trials",
                     label(config), arm.name, format_params(result.params), result.value, result.complete, result.pruned,
                     result.failed)
    return tuned


def run_variant(run_dir: Path, config: ExperimentConfig, seed_list: list[int], storage: str, bars: Bars,
                heartbeat: int | None = DEFAULT_HEARTBEAT, data_dir=None, device="cpu", tensorboard: bool = False) -> None:
    """Tune the variant's arms, write their tuning records, train every missing final run, retrain."""
    name = label(config)
    if config.data.dataset == "mnist1d":
        log.info("%s: generating mnist1d (%d samples, label noise %g)", name, config.data.num_samples,
                 config.data.label_noise)
    else:
        log.info("%s: %s from %s (label noise %g) on %s", name, config.data.dataset, data_dir or "data",
                 config.data.label_noise, device)
    splits = load_splits(config.data, data_dir).to(device)
    tuned = tune_variant(config, config.arms, splits, storage, bars, heartbeat, device)
    for arm in config.arms:
        if arm.search and config.tune.trials:
            run_folder.write_json(run_folder.tuning_path(run_dir, config.variant, arm.name),
                                  {**tuned[arm.name].to_dict(), "storage": masked(storage)})
    for seed in seed_list:                          # seed-major: an interruption leaves complete pairs
        for arm in config.arms:
            params, arm_hash = tuned[arm.name].params, config.arm_hash(arm)
            run = FinalRun(run_folder.run_path(run_dir, config.variant, arm.name, seed), arm, params, seed, splits,
                           key=run_key(arm_hash, params, seed),
                           summary={"config_hash": arm_hash, "tuned_params": params, "label": arm.title},
                           description=f"{arm.name} seed {seed}")
            if run_folder.finished_run(run.path, arm_hash, params):
                checkpoint_of(run_dir, run).clear()       # killed after writing the run, before removing it
                continue
            result = train_final(run_dir, config, run, bars, device, tensorboard)
            last = result.rows[-1]
            log.info("%s %s seed %d: test acc %.4f, train loss %.4f (%.0f s) -> %s", name, arm.name, seed,
                     last["test_acc"], last["train_loss"], result.summary["wall_time"], run.path.with_suffix(".csv"))
    retrain_variant(run_dir, config, seed_list, splits, tuned, bars, device, tensorboard)  # [noise] drop_fractions

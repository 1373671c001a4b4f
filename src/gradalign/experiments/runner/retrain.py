"""Clean-and-retrain: drop the training samples a signal ranks most suspect, retrain, test.

For every noisy sub-experiment and seed, each rule drops some training samples and retrains
the signals arm ([noise] signals_arm) on the rest, with the same seed, the same tuned
parameters and the same number of epochs (so fewer steps), then evaluates test accuracy:

    <signal>-<fraction>   drop the round(fraction * N) samples the signal ranks most suspect,
                          by its value over training (label_noise/detection.py) in that seed's run of
                          the signals arm (its records; ties in a random order from the seed)
    random-<fraction>     drop a random fraction (a control: what dropping data alone does)
    oracle                drop exactly the flipped samples

"All data" is the signals arm's own final run of the seed. The retrain uses the step of the
method the signals arm's method updates like (``Method.updates_like``: the plain baseline for
"signals"), since nothing is recorded. Rules come from [noise] drop_signals x drop_fractions,
plus the oracle ([noise] oracle); no drop_fractions, no retraining.

Runs: ``<out>/clean/<variant>/<rule>/seed<k>.json|csv``, trained and written by the same function
as the final runs (final_runs.train_final, checkpointed on the experiment's device). A run counts as
done when its files agree and it was made from the same signals-arm settings (hash), tuned
parameters and dropped samples (a digest of their ids); otherwise it is trained again.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from gradalign.errors import RunFolderError
from gradalign.experiments import run_folder
from gradalign.experiments.label_noise import digest, drop_rules, dropped
from gradalign.experiments.method_table import METHODS
from gradalign.experiments.runner.final_runs import FinalRun, train_final
from gradalign.experiments.training import run_key

log = logging.getLogger("gradalign")


def _done(path: Path, source_hash: str, params: dict, drop_digest: str) -> bool:
    if not path.exists() or not path.with_suffix(".csv").exists():
        return False
    try:
        summary, _ = run_folder.read_run(path)
    except (OSError, RunFolderError) as e:
        log.warning("%s; training it again", e)
        return False
    return (summary.get("source_hash"), summary.get("tuned_params"), summary.get("drop_digest")) == (
        source_hash, params, drop_digest)


def planned(run_dir: Path, config, seed_list: list[int]) -> tuple[int, int]:
    """(retraining runs of one sub-experiment, how many exist) for the progress bar."""
    if not config.data.label_noise or config.noise.signals_arm is None:
        return 0, 0
    names = [r.name for r in drop_rules(config.noise)]
    return len(names) * len(seed_list), sum(run_folder.retrain_path(run_dir, config.variant, n, s).exists()
                                            for n in names for s in seed_list)


def retrain_variant(run_dir: Path, config, seed_list: list[int], splits, tuned: dict, bars, device,
                    tensorboard: bool = False) -> None:
    """Run every missing clean-and-retrain run of one sub-experiment (after its final runs).

    tuned: {arm name: TuneResult} as the runner has it; bars: the runner's progress bars;
    device: the experiment's training device; tensorboard: also log each evaluation there.
    """
    arm_name = config.noise.signals_arm
    if arm_name is None or not len(splits.flipped_ids) or not drop_rules(config.noise):
        return
    arm = config.arm(arm_name)
    retrain_arm = replace(arm, method=METHODS[arm.method].updates_like or arm.method)
    params, source_hash = tuned[arm_name].params, config.arm_hash(arm)
    full = getattr(splits, arm.train_split)
    for seed in seed_list:
        records = run_folder.read_npz(run_folder.run_path(run_dir, config.variant, arm_name, seed).with_suffix(".npz"))
        for rule in drop_rules(config.noise):
            drop = dropped(rule, records, seed)
            path, drop_digest = run_folder.retrain_path(run_dir, config.variant, rule.name, seed), digest(drop)
            if _done(path, source_hash, params, drop_digest):
                continue
            keep = ~np.isin(full.ids.cpu().numpy(), drop)
            subset = type(full)(full.x[keep], full.y[keep], full.ids[keep])
            n_flipped = int(np.isin(drop, splits.flipped_ids.cpu().numpy()).sum())
            run = FinalRun(path, retrain_arm, params, seed, replace(splits, **{arm.train_split: subset}),
                           key=run_key(f"{config.arm_hash(retrain_arm)}/{drop_digest}", params, seed),
                           summary={"rule": rule.name, "signal": rule.signal, "fraction": rule.fraction,
                                    "dropped": len(drop), "dropped_flipped": n_flipped, "drop_digest": drop_digest,
                                    "source_hash": source_hash, "tuned_params": params},
                           description=f"retrain {rule.name} seed {seed}")
            result = train_final(run_dir, config, run, bars, device, tensorboard)
            log.info("%s [%s] retrain %s seed %d: dropped %d (%d flipped), test acc %.4f", config.name,
                     config.variant, rule.name, seed, len(drop), n_flipped, result.rows[-1]["test_acc"])

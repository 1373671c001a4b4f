"""Clean-and-retrain: drop the training samples a signal ranks most suspect, retrain, test.

For every noisy sub-experiment and seed, each rule drops some training samples and retrains
the signals arm ([noise] signals_arm) on the rest, with the same seed, the same tuned
parameters and the same number of epochs (so fewer steps), then evaluates test accuracy:

    <signal>-<fraction>   drop the round(fraction * N) samples the signal ranks most suspect,
                          by its value over training (detection.py) in that seed's run of
                          the signals arm (its records; ties in a random order from the seed)
    random-<fraction>     drop a random fraction (a control: what dropping data alone does)
    oracle                drop exactly the flipped samples

"All data" is the signals arm's own final run of the seed. The retrain uses the step of the
method the signals arm's method updates like (``Method.updates_like``: the plain baseline for
"signals"), since nothing is recorded. Rules come from [noise] drop_signals x drop_fractions,
plus the oracle ([noise] oracle); no drop_fractions, no retraining.

Runs: ``<out>/clean/<variant>/<rule>/seed<k>.json|csv`` (rundir.write_run). A run counts as
done when its files agree and it was made from the same signals-arm settings (hash), tuned
parameters and dropped samples (a digest of their ids); otherwise it is trained again.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from gradalign.errors import RunFolderError
from gradalign.experiments import rundir
from gradalign.experiments.arms import METHODS
from gradalign.experiments.detection import most_suspect, scores

log = logging.getLogger("gradalign")


class Rule(NamedTuple):
    name: str                 # "loss-0.1", "random-0.2", "oracle"
    signal: str | None        # a detection signal, "random", or None (oracle)
    fraction: float | None    # None for the oracle


def rules(noise_cfg) -> list[Rule]:
    """The rules of a [noise] table (a noise.NoiseConfig, or its dict from config.json)."""
    get = noise_cfg.get if isinstance(noise_cfg, dict) else lambda k: getattr(noise_cfg, k)
    fractions = get("drop_fractions") or ()
    if not fractions:
        return []
    out = [Rule(f"{s}-{f:g}", s, f) for s in get("drop_signals") for f in fractions]
    return out + ([Rule("oracle", None, None)] if get("oracle") else [])


def run_path(run_dir: Path, variant: str, rule: str, seed: int) -> Path:
    return Path(run_dir) / "clean" / rundir.cell(variant, rule) / f"seed{seed}.json"


def dropped(rule: Rule, records: dict, seed: int) -> np.ndarray:
    """Sorted ids of the training samples the rule drops, from the seed's records."""
    ids = np.asarray(records["sample_id"])
    if rule.signal is None:
        return np.sort(ids[np.asarray(records["flipped"], bool)])
    if rule.signal == "random":
        score = np.zeros(len(ids))
    else:
        score = scores(rule.signal, records)[1]
    return np.sort(ids[most_suspect(score, rule.fraction, seed)])


def _digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest()[:16]


def _done(path: Path, source_hash: str, params: dict, digest: str) -> bool:
    if not path.exists() or not path.with_suffix(".csv").exists():
        return False
    try:
        summary, _ = rundir.read_run(path)
    except (OSError, RunFolderError) as e:
        log.warning("%s; training it again", e)
        return False
    return (summary.get("source_hash"), summary.get("tuned_params"), summary.get("drop_digest")) == (
        source_hash, params, digest)


def planned(run_dir: Path, config, seed_list: list[int]) -> tuple[int, int]:
    """(retraining runs of one sub-experiment, how many exist) for the progress bar."""
    if not config.data.label_noise or config.noise.signals_arm is None:
        return 0, 0
    names = [r.name for r in rules(config.noise)]
    return len(names) * len(seed_list), sum(run_path(run_dir, config.variant, n, s).exists()
                                            for n in names for s in seed_list)


def retrain_variant(run_dir: Path, config, seed_list: list[int], splits, tuned: dict, bars) -> None:
    """Run every missing clean-and-retrain run of one sub-experiment (after its final runs).

    tuned: {arm name: TuneResult} as the runner has it; bars: the runner's progress bars.
    """
    from gradalign.experiments.train import train_run        # train imports this module's neighbours

    arm_name = config.noise.signals_arm
    if arm_name is None or not len(splits.flipped_ids) or not rules(config.noise):
        return
    arm = config.arm(arm_name)
    retrain_arm = replace(arm, method=METHODS[arm.method].updates_like or arm.method)
    params, source_hash = tuned[arm_name].params, config.arm_hash(arm)
    full = getattr(splits, arm.train_split)
    for seed in seed_list:
        source = rundir.run_path(run_dir, config.variant, arm_name, seed)
        records = rundir.read_npz(source.with_suffix(".npz"))
        for rule in rules(config.noise):
            drop = dropped(rule, records, seed)
            path, digest = run_path(run_dir, config.variant, rule.name, seed), _digest(drop)
            if _done(path, source_hash, params, digest):
                continue
            keep = ~np.isin(full.ids.cpu().numpy(), drop)
            subset = type(full)(full.x[keep], full.y[keep], full.ids[keep])
            bar = bars.inner(f"retrain {rule.name} seed {seed}", config.train.budget(len(subset)))
            try:
                result = train_run(config, retrain_arm, params, seed, replace(splits, **{arm.train_split: subset}),
                                   eval_split="test", progress=bar)
            finally:
                bar.close()
            for row in result.rows:
                row["variant"] = config.variant
            n_flipped = int(np.isin(drop, splits.flipped_ids.cpu().numpy()).sum())
            rundir.write_run(path, result.rows, {
                **result.summary, "variant": config.variant, "rule": rule.name, "signal": rule.signal,
                "fraction": rule.fraction, "dropped": len(drop), "dropped_flipped": n_flipped, "drop_digest": digest,
                "source_hash": source_hash, "tuned_params": params})
            log.info("%s [%s] retrain %s seed %d: dropped %d (%d flipped), test acc %.4f", config.name,
                     config.variant, rule.name, seed, len(drop), n_flipped, result.rows[-1]["test_acc"])
            bars.tick()


def load(run_dir: Path, meta: dict, variant: str, sources: dict) -> dict:
    """{rule name: {seed: summary}} of the clean-and-retrain runs made from the current signals
    arm's runs `sources` ({seed: summary}: same settings hash and tuned parameters)."""
    noise_cfg = meta["config"].get("noise") or {}
    arm = noise_cfg.get("signals_arm")
    if arm is None:
        return {}
    source_hash = meta["hashes"].get(rundir.cell(variant, arm))
    out = {}
    for rule in rules(noise_cfg):
        found = {}
        for path in sorted((Path(run_dir) / "clean" / rundir.cell(variant, rule.name)).glob("seed*.json")):
            if not path.with_suffix(".csv").exists():
                continue
            try:
                summary, _ = rundir.read_run(path)
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

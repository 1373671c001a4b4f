"""Tuning one arm with Optuna, resumable.

One study per (experiment, variant, arm), named ``<experiment>[/<variant>]/<arm>/<hash>``
where the hash covers everything that decides a trial (data, model, train, the arm and
the tuning settings other than the number of trials), stored in any Optuna storage
(``sqlite:///<run_dir>/study.db`` by default) and opened with ``load_if_exists=True``.

Trials are asked and told by hand (``study.ask`` / ``study.tell``), so that:
- a trial counts as finished when it is COMPLETE, PRUNED, or FAILED because training
  diverged (a property of its parameters, not of the machine); only those count towards
  ``trials``, so a re-run after an interruption runs exactly the missing ones;
- an interrupted trial (Ctrl-C, a crash) is told FAIL without the ``diverged`` mark, or
  stays RUNNING if the process was killed, and is simply run again as a new trial.

Several workers on one study (``gradalign tune`` on many machines with one
``--storage postgresql://...``; storage.py): the study ends with exactly ``trials``
finished trials, none run twice. On storages with a heartbeat (database servers) a worker
(1) fails the trials of dead workers first (silent for 2 x heartbeat: FAIL, and re-queued
with the same parameters, which the next ask() picks up), (2) asks for a trial only while
finished + running < trials, otherwise waits for the running ones (one of them may still
die and need a retry), and (3) after ask(), counts the finished trials and the running ones
asked BEFORE its own (lower numbers): if those already make ``trials``, another worker won
the race for the last slot and its own trial is told FAIL with the user attribute
``surplus`` and never trained. The rule is decided by trial number, so of two workers
racing for one slot exactly one runs. On SQLite and journal files (no heartbeat: a RUNNING
trial may belong to a killed process) running trials are not counted, so several processes on
one SQLite file can overshoot by one trial each.

Determinism: each trial's parameters are drawn by a sampler seeded with ``sampler_seed`` plus the
number of finished trials before it (plus, on a heartbeat storage, the running trials asked before
it, so that concurrent workers draw differently). TPE (without heartbeats: RUNNING trials ignored)
and the pruner read only COMPLETE and PRUNED trials, so a trial killed or interrupted mid-way (left
RUNNING or FAIL) changes nothing: the re-run
asks the same parameters again, and a killed run ends with exactly the uninterrupted one's trials
and best parameters (up to trial numbers).

Objective (maximised): the validation accuracy on the split carved from the training set,
``[tune] objective`` = "final" (at the end of the budget, the default: the final runs
report final test accuracy), "best" (over evaluations) or "mean_last" (mean of the last
``last_k`` evaluations). Every trial trains with the same seed (``[tune] seed``), distinct
from the final seeds. With ``pruning`` a median pruner stops trials whose validation accuracy falls below the
median of earlier trials at the same evaluation (after ``startup_trials`` trials, and not
in the first third of a run, where early accuracy says little about the final one).
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.trial import TrialState

from gradalign.errors import GradAlignError
from gradalign.experiments.config import ArmConfig, ExperimentConfig
from gradalign.experiments.data import data_sizes
from gradalign.experiments.run_folder import cell
from gradalign.experiments.training import TrainingDiverged, train_run
from gradalign.experiments.tuning import storage as storages

log = logging.getLogger("gradalign")
optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class TuneResult:
    params: dict            # the best trial's parameters ({} when nothing is searched)
    value: float            # its objective value (nan when nothing is searched)
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    study_name: str = ""
    best_trial: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def study_name(config: ExperimentConfig, arm: ArmConfig) -> str:
    return "/".join([config.name, cell(config.variant, arm.name), config.arm_hash(arm, tuning=True)])


def objective_value(rows: list[dict], objective: str, last_k: int) -> float:
    """Validation accuracy of a run under the objective "final", "best" or "mean_last"."""
    acc = [r["val_acc"] for r in rows]
    if objective == "best":
        return float(np.max(acc))
    if objective == "mean_last":
        return float(np.mean(acc[-last_k:]))
    return float(acc[-1])


def _finished(trial) -> bool:
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and trial.user_attrs.get("diverged", False))


def count_finished(study: optuna.Study) -> int:
    return sum(_finished(t) for t in study.get_trials(deepcopy=False))


def _warmup(config: ExperimentConfig) -> int:
    """Evaluations before a trial may be pruned: the first third of a tuning run (at least one)."""
    _, n_train, _ = data_sizes(config.data)
    evaluations = math.ceil(config.train.budget(n_train) / config.train.eval_interval(n_train))
    return max(1, evaluations // 3)


def open_study(config: ExperimentConfig, arm: ArmConfig, storage: str,
               heartbeat: int | None = storages.DEFAULT_HEARTBEAT) -> optuna.Study:
    """Create or load the arm's study (each trial's sampler is seeded in tune_arm).

    `storage` is a URL (storage.py); `heartbeat` the seconds between a worker's heartbeats
    on database servers (None: no heartbeat)."""
    name = study_name(config, arm)
    t = config.tune
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=t.startup_trials, n_warmup_steps=_warmup(config))
              if t.pruning else optuna.pruners.NopPruner())
    study = optuna.create_study(storage=storages.open_storage(storage, heartbeat), study_name=name,
                                direction="maximize", load_if_exists=True, pruner=pruner)
    study.sampler = _sampler(t, t.sampler_seed)
    return study


def _sampler(t, seed: int, concurrent: bool = False) -> optuna.samplers.TPESampler:
    """TPE seeded with `seed`; with concurrent workers (heartbeat storages) RUNNING trials count as
    bad ones ("constant liar", so workers spread out), otherwise they are ignored: a RUNNING trial is
    then one a killed process left behind, and must not move the next draws."""
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(t.trials // 3, 1)),
                                      constant_liar=concurrent)


def _running(trials, before: int | None = None) -> int:
    return sum(t.state == TrialState.RUNNING and (before is None or t.number < before) for t in trials)


def _next_trial(study: optuna.Study, trials: int, heartbeat: bool) -> optuna.Trial | None:
    """A trial to run, or None when the study has its `trials` finished ones (module docstring)."""
    while True:
        if heartbeat:
            storages.fail_stale_trials(study)
        now = study.get_trials(deepcopy=False)
        done = sum(_finished(t) for t in now)
        if done >= trials:
            return None
        if heartbeat and done + _running(now) >= trials:
            time.sleep(min(2.0, storages.heartbeat_interval(study)))   # others are running the last ones
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                 # "heartbeat is supposed to be used with optimize"
            trial = study.ask()
        if not heartbeat:
            return trial
        storages.beat(study, trial)   # at once: a trial never beaten is never found stale if its worker dies now
        now = study.get_trials(deepcopy=False)
        if sum(_finished(t) for t in now) + _running(now, before=trial.number) < trials:
            return trial
        trial.set_user_attr("surplus", True)              # lost the race for the last slot
        study.tell(trial, state=TrialState.FAIL)


def tune_arm(config: ExperimentConfig, arm: ArmConfig, splits, *, storage: str, trials: int | None = None,
             on_trial=None, progress_factory=None, heartbeat: int | None = storages.DEFAULT_HEARTBEAT,
             device="cpu") -> TuneResult:
    """Run the arm's missing trials and return its best parameters.

    Args:
        trials: target number of finished trials (default ``config.tune.trials``).
        heartbeat: seconds between heartbeats on database storages (storage.py).
        on_trial: called with the finished FrozenTrial after each trial run here.
        progress_factory: callable(description, total samples) -> a tqdm-like bar, or None.
        device: where the trials train (device.py).
    Raises:
        GradAlignError: every finished trial failed (diverged): narrow the search space.
    """
    trials = config.tune.trials if trials is None else trials
    if not arm.search or trials == 0:
        return TuneResult(params={}, value=float("nan"))
    study = open_study(config, arm, storage, heartbeat)
    beats = storages.heartbeat_interval(study) is not None
    t = config.tune
    attrs = {"seed": t.seed, "config_hash": config.arm_hash(arm, tuning=True), "arm": arm.name,
             "experiment": config.name, "variant": config.variant,
             "worker": f"{socket.gethostname()}:{os.getpid()}"}
    while (trial := _next_trial(study, trials, beats)) is not None:
        now = study.get_trials(deepcopy=False)
        done = sum(_finished(tr) for tr in now)
        # seeded by the trials before it, never by trials a killed process left behind (module docstring)
        study.sampler = _sampler(t, t.sampler_seed + done + (_running(now, before=trial.number) if beats else 0),
                                 concurrent=beats)
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        params = {sp.name: sp.suggest(trial) for sp in arm.search}
        bar = progress_factory(f"tune {arm.name} {done + 1}/{trials}", config.train.budget(len(splits.train))) \
            if progress_factory else None

        evaluation = itertools.count()

        def report(row):
            trial.report(row["val_acc"], next(evaluation))
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            with storages.Heartbeat(study, trial):
                result = train_run(config, arm, params, t.seed, splits, eval_split="val", on_eval=report,
                                   progress=bar, device=device)
        except optuna.TrialPruned:
            frozen = study.tell(trial, state=TrialState.PRUNED)
        except TrainingDiverged as e:
            trial.set_user_attr("diverged", True)
            trial.set_user_attr("error", str(e))
            log.warning("trial %d of %s diverged: %s", trial.number, arm.name, e)
            frozen = study.tell(trial, state=TrialState.FAIL)
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)      # interrupted: not counted, run again
            raise
        else:
            frozen = study.tell(trial, objective_value(result.rows, t.objective, t.last_k))
        finally:
            if bar is not None:
                bar.close()
        if on_trial is not None:
            on_trial(frozen)
    return best_of(study, arm)


def best_of(study: optuna.Study, arm: ArmConfig) -> TuneResult:
    all_trials = study.get_trials(deepcopy=False)
    states = [t.state for t in all_trials]
    complete = [t for t in all_trials if t.state == TrialState.COMPLETE]
    failed = sum(1 for t in all_trials if t.state == TrialState.FAIL and t.user_attrs.get("diverged"))
    if not complete:
        raise GradAlignError(f"no trial of arm {arm.name!r} completed ({failed} diverged, "
                             f"{states.count(TrialState.PRUNED)} pruned): narrow its search space, "
                             "e.g. lower the learning-rate range")
    best = max(complete, key=lambda t: (t.value, -t.number))     # ties: the earliest trial
    return TuneResult(params=dict(best.params), value=float(best.value), complete=len(complete),
                      pruned=states.count(TrialState.PRUNED), failed=failed, study_name=study.study_name,
                      best_trial=best.number)

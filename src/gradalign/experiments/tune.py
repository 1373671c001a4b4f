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

Objective (maximised): the validation accuracy on the split carved from the training set,
``[tune] objective`` = "final" (at the end of the budget, the default: the final runs
report final test accuracy), "best" (over evaluations) or "mean_last" (mean of the last
``last_k`` evaluations). Every trial trains with the same seed (``[tune] seed``), distinct
from the final seeds. The TPE sampler is seeded with ``sampler_seed`` plus the number of
trials already in the study, so a resumed study does not replay the same random draws.
With ``pruning`` a median pruner stops trials whose validation accuracy falls below the
median of earlier trials at the same evaluation (after ``startup_trials`` trials, and not
in the first third of a run, where early accuracy says little about the final one).
"""
from __future__ import annotations

import itertools
import math
import logging
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.trial import TrialState

from gradalign.errors import GradAlignError
from gradalign.experiments.config import ArmConfig, ExperimentConfig
from gradalign.experiments.data import data_sizes
from gradalign.experiments.rundir import cell
from gradalign.experiments.train import TrainingDiverged, train_run

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


def open_study(config: ExperimentConfig, arm: ArmConfig, storage: str) -> optuna.Study:
    """Create or load the arm's study; the sampler is seeded from the study's history."""
    name = study_name(config, arm)
    t = config.tune
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=t.startup_trials, n_warmup_steps=_warmup(config))
              if t.pruning else optuna.pruners.NopPruner())
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                load_if_exists=True, pruner=pruner)
    seed = t.sampler_seed + len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(t.trials // 3, 1)))
    return study


def tune_arm(config: ExperimentConfig, arm: ArmConfig, splits, *, storage: str, trials: int | None = None,
             on_trial=None, progress_factory=None, device="cpu") -> TuneResult:
    """Run the arm's missing trials and return its best parameters.

    Args:
        trials: target number of finished trials (default ``config.tune.trials``).
        on_trial: called with the finished FrozenTrial after each trial run here.
        progress_factory: callable(description, total samples) -> a tqdm-like bar, or None.
        device: where the trials train (device.py).
    Raises:
        GradAlignError: every finished trial failed (diverged): narrow the search space.
    """
    trials = config.tune.trials if trials is None else trials
    if not arm.search or trials == 0:
        return TuneResult(params={}, value=float("nan"))
    study = open_study(config, arm, storage)
    t = config.tune
    attrs = {"seed": t.seed, "config_hash": config.arm_hash(arm, tuning=True), "arm": arm.name,
             "experiment": config.name, "variant": config.variant}
    while (done := count_finished(study)) < trials:
        trial = study.ask()
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
            result = train_run(config, arm, params, t.seed, splits, eval_split="val", on_eval=report, progress=bar,
                               device=device)
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

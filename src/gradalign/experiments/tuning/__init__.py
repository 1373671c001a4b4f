"""Tuning an arm with Optuna (study.py: resumable, several workers may share one study) on any
Optuna storage (storage.py: SQLite, journal files, database servers with heartbeat and retry)."""
from gradalign.experiments.tuning.storage import DEFAULT_HEARTBEAT, open_storage
from gradalign.experiments.tuning.study import TuneResult, best_of, count_finished, open_study, study_name, tune_arm

__all__ = ["DEFAULT_HEARTBEAT", "TuneResult", "best_of", "count_finished", "open_storage", "open_study", "study_name",
           "tune_arm"]

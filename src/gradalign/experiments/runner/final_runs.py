"""ONE function trains and writes every final run of an experiment (each arm on each seed) and
every clean-and-retrain run: `train_final`. A run is checkpointed after every evaluation
(``checkpoints/...``, training/checkpoint.py) and resumes from there after a kill; the
checkpoint key (`FinalRun.key`) is what the run computes, so a changed configuration never
resumes a stale one; the finished run is written atomically (run_folder.write_run) and its
checkpoint removed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gradalign.experiments.config import ArmConfig, ExperimentConfig
from gradalign.experiments.data import Splits
from gradalign.experiments.method_table import file_columns
from gradalign.experiments.run_folder import checkpoint_path, tensorboard_path, write_run
from gradalign.experiments.runner.progress import Bars, unit
from gradalign.experiments.training import RunCheckpoint, RunResult, train_run
from gradalign.experiments.training.tensorboard import ScalarLog


@dataclass(frozen=True)
class FinalRun:
    """One run to train on the test protocol and write to the run folder.

    path: its summary JSON (run_folder.run_path or retrain_path); key: the checkpoint key (a hash
    of what the run computes: training/checkpoint.run_key); summary: entries written beside the
    training's summary (hashes, parameters, drop rule...); description: the progress bar's text.
    """

    path: Path
    arm: ArmConfig
    params: dict
    seed: int
    splits: Splits
    key: str
    summary: dict
    description: str


def checkpoint_of(run_dir: Path, run: FinalRun) -> RunCheckpoint:
    return RunCheckpoint(checkpoint_path(run_dir, run.path), run.key, root=Path(run_dir) / "checkpoints")


def train_final(run_dir: Path, config: ExperimentConfig, run: FinalRun, bars: Bars, device,
                tensorboard: bool = False) -> RunResult:
    """Train `run` (resuming its checkpoint), write it, remove the checkpoint, tick the outer bar;
    with `tensorboard`, each evaluation also goes to <out>/tensorboard/... (training/tensorboard.py)."""
    checkpoint = checkpoint_of(run_dir, run)
    scalars = ScalarLog(tensorboard_path(run_dir, run.path)) if tensorboard else None
    bar = bars.inner(run.description, config.train.budget(len(getattr(run.splits, run.arm.train_split))), unit(config))
    try:
        result = train_run(config, run.arm, run.params, run.seed, run.splits, eval_split="test", progress=bar,
                           device=device, checkpoint=checkpoint, on_eval=scalars)
    finally:
        bar.close()
        if scalars is not None:
            scalars.close()
    for row in result.rows:
        row["variant"] = config.variant
    write_run(run.path, result.rows, {**result.summary, "variant": config.variant, **run.summary},
              records=result.records, columns=file_columns())
    checkpoint.clear()
    bars.tick()
    return result

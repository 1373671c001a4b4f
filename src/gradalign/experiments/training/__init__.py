"""Training one arm: the loop as a small recipe and what it needs.

    loop.py         TrainingRun (setup, resume, train, evaluate, save, finish) and train_run
    evaluation.py   logits and mean loss / accuracy on a whole split
    summary.py      a finished run's summary (final metrics, GWA epoch, flipped-label AUROC)
    optimizer.py    the base optimizer and its learning-rate schedule
    checkpoint.py   a run's checkpoint folder: atomic state, GWA epochs, the key
    device.py       --device, bf16 autocast, GPU settings
    parallel.py     data parallel: torchrun / `--nproc`, each rank's shard of the global batch
    tensorboard.py  --tensorboard: each evaluation as TensorBoard scalars
"""
from gradalign.experiments.training.checkpoint import RunCheckpoint, run_key
from gradalign.experiments.training.device import autocast, resolve_device
from gradalign.experiments.training.evaluation import evaluate, logits_of
from gradalign.experiments.training.loop import RunResult, TrainingDiverged, TrainingRun, generators, train_run
from gradalign.experiments.training.optimizer import Optimizer
from gradalign.experiments.training.parallel import Parallel

__all__ = ["Optimizer", "Parallel", "RunCheckpoint", "RunResult", "TrainingDiverged", "TrainingRun", "autocast",
           "evaluate", "generators", "logits_of", "resolve_device", "run_key", "train_run"]

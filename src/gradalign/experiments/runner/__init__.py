"""Experiments end to end: the commands' work.

    experiment.py   reproduce (tune, train over seeds, report), tune_only, run_single
    variants.py     one sub-experiment: tune its arms, its final runs, clean-and-retrain
    final_runs.py   train_final: the ONE function that trains and writes a final or retrained run
    retrain.py      clean-and-retrain: drop the most suspect samples, retrain
    progress.py     the progress bars
"""
from gradalign.experiments.runner.experiment import Reproduced, reproduce, resolve, run_single, torch_threads, tune_only

__all__ = ["Reproduced", "reproduce", "resolve", "run_single", "torch_threads", "tune_only"]

"""The method table: what an arm's `method` means, and the training step of each method.

    table.py      Method, MethodTable, METHODS (one entry per method: parameters, step, report
                  extras), and the evaluation columns the steps fill
    steps.py      Step (the baseline) and the steps of GASW/GDSW, GAGA, GVR and the two-view control
    recording.py  the "signals" method's step: the baseline, recording per-sample signals
"""
from gradalign.experiments.method_table.recording import RecordingStep
from gradalign.experiments.method_table.steps import AccumulateStep, Forward, GDSWStep, Step, TwoViewStep, WeightedStep
from gradalign.experiments.method_table.table import (COMMON, METHODS, Method, MethodTable, Param, evaluation_columns,
                                                      file_columns)

__all__ = ["AccumulateStep", "COMMON", "Forward", "GDSWStep", "METHODS", "Method", "MethodTable", "Param",
           "RecordingStep", "Step", "TwoViewStep", "WeightedStep", "evaluation_columns", "file_columns"]

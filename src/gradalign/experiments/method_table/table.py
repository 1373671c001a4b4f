"""The method table: what an arm's `method` means, one entry per method.

An entry declares the method's parameters (default and check each), its training step (a
`steps.Step` subclass that forms p.grad) and what the report shows for it. Config parsing,
parameter resolution, the training loop and the report all read this table, so adding a
method to the experiments is one `METHODS.register(Method(...))` plus its library object.

Every method also takes the common parameters lr, momentum, weight_decay and batch_size
(defaults from the config's [train] table) and augment (default: the entry's `augment`).
Method defaults come from the library objects' own signatures, so they cannot drift.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import gradalign as ga
from gradalign.experiments import checks
from gradalign.experiments.method_table import steps as st
from gradalign.experiments.method_table.recording import RecordingStep
from gradalign.methods.gaga import SNR_RULES
from gradalign.methods.gvr import PENALTY_MODES, SUBSET_FORWARDS


@dataclass(frozen=True)
class Param:
    """One parameter of a method: its default, its check, and whether it is an integer
    (searched with Optuna's suggest_int unless the search says otherwise)."""

    name: str
    default: Any
    check: checks.Check
    integer: bool = False


def default_of(obj, name: str):
    """The default of keyword `name` in the signature of a library class or function."""
    return inspect.signature(obj).parameters[name].default


TRAIN_DEFAULTS = ("lr", "momentum", "weight_decay", "batch_size")  # default from [train]
COMMON = (Param("lr", None, checks.positive), Param("momentum", None, checks.unit_right_open),
          Param("weight_decay", None, checks.nonneg), Param("batch_size", None, checks.pos_int, integer=True),
          Param("augment", None, checks.boolean))


@dataclass(frozen=True)
class Method:
    """An experiment method.

    name: the `method` of an [[arms]] table. step: its training step class (steps.py).
    params: its own parameters beyond COMMON. augment: the default of `augment`.
    fixed: settings the step reads that the user cannot change (two-view's alpha = 0).
    report_metrics: run metrics the report adds for arms of this method (report/metrics.py).
    plots: extra figures the report draws for it (names known to report/figures.py).
    records: its step keeps per-sample records (Step.records) that the runner stores beside
        each final run (recording.py).
    updates_like: the method whose updates (p.grad) it makes, when it only adds recording;
        clean-and-retrain (runner/retrain.py) retrains with that method's cheaper step.
    """

    name: str
    step: type[st.Step]
    params: tuple[Param, ...] = ()
    augment: bool = False
    fixed: tuple[tuple[str, Any], ...] = ()
    report_metrics: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()
    records: bool = False
    updates_like: str | None = None

    @property
    def all_params(self) -> dict[str, Param]:
        return {p.name: p for p in COMMON + self.params}

    @property
    def columns(self) -> tuple[str, ...]:
        """The evaluation-row diagnostics its step fills."""
        return self.step.columns

    def defaults(self, train) -> dict:
        """Every parameter's default, the common ones from [train] (a TrainConfig)."""
        out = {name: getattr(train, name) for name in TRAIN_DEFAULTS}
        out["augment"] = self.augment
        out.update({p.name: p.default for p in self.params})
        out.update(dict(self.fixed))
        return out


class MethodTable:
    """The registry of methods, in registration order; one explicit object, no import side effects."""

    def __init__(self, methods: list[Method] | None = None):
        self._methods: dict[str, Method] = {}
        for m in methods or []:
            self.register(m)

    def register(self, method: Method) -> None:
        problem = checks.word(method.name)
        if problem:
            raise ValueError(f"method name must be {problem}, got {method.name!r}")
        if method.name in self._methods:
            raise ValueError(f"method {method.name!r} is already registered")
        self._methods[method.name] = method

    def unregister(self, name: str) -> None:
        del self._methods[name]

    def __getitem__(self, name: str) -> Method:
        return self._methods[name]

    def __contains__(self, name: str) -> bool:
        return name in self._methods

    def get(self, name: str) -> Method | None:
        return self._methods.get(name)

    def names(self) -> tuple[str, ...]:
        return tuple(self._methods)

    def columns(self) -> tuple[str, ...]:
        """Every method's diagnostic columns, each once, in registration order."""
        return tuple(dict.fromkeys(c for m in self._methods.values() for c in m.columns))


_WEIGHTING = (Param("gamma", default_of(ga.GASW, "gamma"), checks.nonneg),
              Param("leave_one_out", default_of(ga.GASW, "leave_one_out"), checks.boolean))
_VIEWS = (Param("gvr_mode", default_of(ga.GVR, "mode"), checks.one_of(*PENALTY_MODES)),
          Param("gvr_layers", "head", checks.one_of("head", "last_stage")),   # a group of model.module_groups()
          Param("subset", default_of(ga.GVR, "subset"), checks.pos_int, integer=True),
          Param("subset_forward", default_of(ga.GVR, "subset_forward"), checks.one_of(*SUBSET_FORWARDS)))

METHODS = MethodTable([
    Method("baseline", st.Step),
    Method("gasw", st.WeightedStep, _WEIGHTING, report_metrics=("zero_weight_frac", "weight_entropy")),
    Method("gdsw", st.GDSWStep, _WEIGHTING, report_metrics=("zero_weight_frac", "weight_entropy")),
    Method("gaga", st.AccumulateStep, (
        Param("tau", default_of(ga.GSNRAccumulator, "tau"), checks.number),
        Param("increment", default_of(ga.GSNRAccumulator, "increment"), checks.pos_int, integer=True),
        Param("max_samples", default_of(ga.GSNRAccumulator, "max_samples"), checks.pos_int, integer=True),
        Param("rule", default_of(ga.GSNRAccumulator, "rule"), checks.one_of(*SNR_RULES)),
    ), report_metrics=("samples_per_step", "acc_std_last"), plots=("gaga_dynamics",)),
    Method("gvr", st.TwoViewStep, (Param("alpha", default_of(ga.GVR, "alpha"), checks.nonneg),) + _VIEWS,
           augment=True),
    Method("two_view", st.TwoViewStep, _VIEWS, augment=True, fixed=(("alpha", 0.0),)),
    Method("signals", RecordingStep, records=True, updates_like="baseline"),
])


_LEADING = ("arm", "seed", "epoch", "samples", "step", "train_loss", "train_acc", "val_loss", "val_acc",
            "test_loss", "test_acc", "gwa", "mean_alignment", "samples_per_step")
_TRAILING = ("lr", "wall_time")


def evaluation_columns(table: MethodTable = METHODS) -> tuple[str, ...]:
    """The columns of an evaluation row: shared ones, then every method's diagnostics."""
    return _LEADING + tuple(c for c in table.columns() if c not in _LEADING + _TRAILING) + _TRAILING


def file_columns(table: MethodTable = METHODS) -> tuple[str, ...]:
    """The columns of a run's CSV file and of evaluations.csv."""
    return ("variant",) + evaluation_columns(table)

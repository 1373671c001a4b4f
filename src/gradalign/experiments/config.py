"""Experiment configurations: TOML files parsed into typed, validated, frozen dataclasses.

A bundled experiment is one TOML file in ``gradalign/configs/`` (``load_config("gasw")``);
any other path works too (config_sources.py reads it). Every table rejects unknown keys with
a ConfigError that lists the valid ones, and every value is checked before training starts.

Schema (defaults in brackets)::

    name = "gasw"                      # required; names the studies and the run folder
    description = "..."                # one line for the report
    [data]       num_samples [4000], seed [42], val_fraction [0.2], label_noise [0.0], noise_seed [0],
                 noise_kind ["symmetric"|"pair"] (noise.py)
    [model]      kind ["mlp"|"resmlp"|"conv1d"], hidden [256], options [{}] (kind-specific kwargs)
    [train]      optimizer ["adam"|"sgd"], lr [1e-3], momentum [0.0], weight_decay [0.0],
                 batch_size [32], epochs [50] OR budget_samples, eval_every [1] (epochs, or
                 samples with budget_samples), schedule ["none"|"cosine"]
    [tune]       trials [20] (completed trials per arm), objective ["final"|"best"|"mean_last"],
                 last_k [3], sampler_seed [0], seed [1000] (training seed of every trial),
                 pruning [true] (median pruner), startup_trials [5]
    [final]      seeds [5], first_seed [0], reference [first arm] (the arm differences are taken to)
    [experiment] noise_levels [[]] (one sub-experiment per level: a rate for symmetric noise, or
                 "KIND:RATE", e.g. "pair:0.2"; noise.py), gwa_mode
                 ["scratch"|"finetune"], gwa_skip_fraction [0.1], stability_last [10]
    [noise]      signals_arm, reference_signal ["loss"], drop_fractions [[]], drop_signals,
                 oracle [true]: the label-noise analysis (noise.NoiseConfig)
    [quick]      tables of the same shape, merged over the above by ``--quick``
    [[arms]]     name, method (a name in arms.METHODS), label, train_split ["train_full"|"train"],
                 params {fixed}, search {param = {low, high, log, type} | {choices = [...]}}

Arm parameters (fixed or searched) are the method's, as declared in arms.METHODS: lr,
momentum, weight_decay, batch_size, augment (every method); gamma, leave_one_out (gasw,
gdsw); tau, increment, max_samples, rule (gaga); alpha, gvr_mode, gvr_layers, subset (gvr;
two_view takes the same except alpha, which is 0).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from gradalign.errors import ConfigError
from gradalign.experiments import checks, noise
from gradalign.experiments.arms import METHODS
from gradalign.experiments.config_sources import apply_overrides, merge, read_toml
from gradalign.experiments.data import split_sizes
from gradalign.experiments.models import MODELS

OBJECTIVES = ("final", "best", "mean_last")
TABLES = ("data", "model", "train", "tune", "final", "experiment", "noise")


@dataclass(frozen=True)
class DataConfig:
    num_samples: int = 4000
    seed: int = 42
    val_fraction: float = 0.2
    label_noise: float = 0.0
    noise_seed: int = 0
    noise_kind: str = "symmetric"


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "mlp"
    hidden: int = 256
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int | None = None
    budget_samples: int | None = None
    eval_every: int = 1
    schedule: str = "none"

    def budget(self, n_train: int) -> int:
        """Training budget in samples for a training set of n_train samples."""
        return self.budget_samples if self.budget_samples is not None else self.epochs * n_train

    def eval_interval(self, n_train: int) -> int:
        """Samples between evaluations."""
        return self.eval_every if self.budget_samples is not None else self.eval_every * n_train


@dataclass(frozen=True)
class TuneConfig:
    trials: int = 20
    objective: str = "final"
    last_k: int = 3
    sampler_seed: int = 0
    seed: int = 1000
    pruning: bool = True
    startup_trials: int = 5


@dataclass(frozen=True)
class FinalConfig:
    seeds: int = 5
    first_seed: int = 0
    reference: str | None = None  # the arm paired differences are taken to; parsing sets the first arm


@dataclass(frozen=True)
class AnalysisConfig:
    noise_levels: tuple = ()      # canonical entries: a rate (symmetric) or "KIND:RATE"
    gwa_mode: str = "scratch"
    gwa_skip_fraction: float = 0.1
    stability_last: int = 10


@dataclass(frozen=True)
class SearchParam:
    """One Optuna distribution: float/int in [low, high] (log scale optional) or choices."""

    name: str
    type: str = "float"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial):
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)


@dataclass(frozen=True)
class ArmConfig:
    name: str
    method: str
    label: str = ""
    train_split: str = "train_full"
    params: dict = field(default_factory=dict)
    search: tuple = ()

    @property
    def title(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    description: str = ""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig(epochs=50)
    tune: TuneConfig = TuneConfig()
    final: FinalConfig = FinalConfig()
    experiment: AnalysisConfig = AnalysisConfig()
    noise: noise.NoiseConfig = noise.NoiseConfig()
    arms: tuple = ()
    variant: str = ""

    def arm(self, name: str) -> ArmConfig:
        for a in self.arms:
            if a.name == name:
                return a
        raise ConfigError(f"no arm named {name!r}; arms: {', '.join(a.name for a in self.arms)}")

    def variants(self) -> list[ExperimentConfig]:
        """One config per label-noise level in [experiment] noise_levels, else [self]."""
        if not self.experiment.noise_levels:
            return [self]
        levels = [noise.parse_level(entry) for entry in self.experiment.noise_levels]
        return [replace(self, data=replace(self.data, label_noise=lv.rate, noise_kind=lv.kind), variant=lv.variant)
                for lv in levels]

    def arm_hash(self, arm: ArmConfig, *, tuning: bool = False) -> str:
        """Hash of everything that decides an arm's runs: data, model, train and the arm; with
        tuning=True also the tuning settings that decide its trials (not their number)."""
        # noise_kind at its default is left out, so run folders made before it existed stay valid
        data = {k: v for k, v in asdict(self.data).items() if (k, v) != ("noise_kind", "symmetric")}
        parts = {"data": data, "model": asdict(self.model), "train": asdict(self.train),
                 "arm": {k: v for k, v in asdict(arm).items() if k != "label"}}
        if tuning:
            t = asdict(self.tune)
            parts["tune"] = {k: v for k, v in t.items() if k != "trials"}
        blob = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- parsing

_SPECS = {  # table -> {key: check}; an entry None means "validated elsewhere"
    "data": {"num_samples": checks.pos_int, "seed": checks.nonneg_int, "val_fraction": checks.unit_open,
             "label_noise": checks.unit_closed, "noise_seed": checks.nonneg_int,
             "noise_kind": checks.one_of(*noise.NOISE_KINDS)},
    "model": {"kind": checks.one_of(*MODELS), "hidden": checks.pos_int, "options": None},
    "train": {"optimizer": checks.one_of("adam", "sgd"), "lr": checks.positive, "momentum": checks.unit_right_open,
              "weight_decay": checks.nonneg, "batch_size": checks.pos_int, "epochs": checks.pos_int,
              "budget_samples": checks.pos_int, "eval_every": checks.pos_int,
              "schedule": checks.one_of("none", "cosine")},
    "tune": {"trials": checks.nonneg_int, "objective": checks.one_of(*OBJECTIVES), "last_k": checks.pos_int,
             "sampler_seed": checks.nonneg_int, "seed": checks.nonneg_int, "pruning": checks.boolean,
             "startup_trials": checks.nonneg_int},
    "final": {"seeds": checks.pos_int, "first_seed": checks.nonneg_int, "reference": None},
    "experiment": {"noise_levels": None, "gwa_mode": checks.one_of("scratch", "finetune"),
                   "gwa_skip_fraction": checks.unit_right_open, "stability_last": checks.pos_int},
    "noise": dict.fromkeys(noise.KEYS),
}
TOP_KEYS = ("name", "description", "quick", "arms") + TABLES
_ARM_KEYS = ("name", "method", "label", "train_split", "params", "search")
_SEARCH_KEYS = ("low", "high", "log", "type", "choices")


def _err(where: str, msg: str) -> ConfigError:
    return ConfigError(f"{where}: {msg}")


def _check_keys(where: str, table, valid) -> None:
    if not isinstance(table, dict):
        raise _err(where, f"expected a table, got {table!r}")
    unknown = sorted(set(table) - set(valid))
    if unknown:
        raise _err(where, f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                          f"valid keys: {', '.join(valid)}")


def _check_values(prefix: str, table: dict, spec: dict) -> None:
    """Check every value of `table` against spec {key: check}; errors name `prefix` + key."""
    for key, value in table.items():
        problem = spec[key](value) if spec[key] else None
        if problem:
            raise _err(f"{prefix}{key}", f"expected {problem}, got {value!r}")


def _check_table(src: str, name: str, table: dict) -> dict:
    spec = _SPECS[name]
    _check_keys(f"{src} [{name}]", table, list(spec))
    _check_values(f"{src} [{name}] ", table, spec)
    return table


def override(raw: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys of a raw config, e.g. {"train.epochs": 2, "arms.gasw.params.gamma": 1.0}."""
    return apply_overrides(raw, overrides, tables=TABLES, top_keys=TOP_KEYS)


def _parse_search(where: str, param, spec) -> SearchParam:
    if not isinstance(spec, dict):
        raise _err(where, "expected a table like {low = 1e-4, high = 1e-2, log = true} or {choices = [...]}")
    _check_keys(where, spec, _SEARCH_KEYS)
    check, name = param.check, param.name
    if "choices" in spec:
        extra = sorted(set(spec) - {"choices", "type"})
        if extra or not isinstance(spec["choices"], list) or not spec["choices"]:
            raise _err(where, "choices must be a non-empty list and comes without low/high/log")
        for c in spec["choices"]:
            if check(c):
                raise _err(where, f"choice {c!r} is not {check(c)}")
        return SearchParam(name, "categorical", choices=tuple(spec["choices"]))
    kind = spec.get("type", "int" if param.integer else "float")
    if kind not in ("float", "int"):
        raise _err(where, f"type must be 'float' or 'int', got {kind!r}")
    if "low" not in spec or "high" not in spec:
        raise _err(where, "needs low and high")
    low, high, log = spec["low"], spec["high"], spec.get("log", False)
    for bound in (low, high):
        problem = check(bound) if kind == "float" or checks.is_int(bound) else "an integer"
        if problem:
            raise _err(where, f"bound {bound!r} is not {problem}")
    if not low < high:
        raise _err(where, f"needs low < high, got low={low!r}, high={high!r}")
    if not isinstance(log, bool) or (log and low <= 0):
        raise _err(where, "log must be true or false, and log scale needs low > 0")
    return SearchParam(name, kind, float(low), float(high), log)


def _parse_arm(src: str, index: int, raw) -> ArmConfig:
    where = f"{src} [[arms]] #{index + 1}"
    _check_keys(where, raw, _ARM_KEYS)
    name, method = raw.get("name"), raw.get("method")
    if checks.word(name):
        raise _err(where, f"name must be {checks.word(name)}, got {name!r}")
    where = f"{src} arm {name!r}"
    if method not in METHODS:
        raise _err(where, f"method must be one of {', '.join(METHODS.names())}, got {method!r}")
    if raw.get("train_split", "train_full") not in ("train_full", "train"):
        raise _err(where, f"train_split must be 'train_full' or 'train', got {raw['train_split']!r}")
    if not isinstance(raw.get("label", ""), str):
        raise _err(where, "label must be a string")
    declared = METHODS[method].all_params
    params = raw.get("params", {})
    _check_keys(f"{where} params", params, declared)
    _check_values(f"{where} params.", params, {k: declared[k].check for k in params})
    search = raw.get("search", {})
    _check_keys(f"{where} search", search, declared)
    both = sorted(set(params) & set(search))
    if both:
        raise _err(where, f"{', '.join(both)} is both fixed (params) and searched (search); keep one")
    space = tuple(_parse_search(f"{where} search.{k}", declared[k], v) for k, v in search.items())
    return ArmConfig(name, method, raw.get("label", ""), raw.get("train_split", "train_full"), dict(params), space)


def check_params(arm: ArmConfig, params: dict) -> dict:
    """Validate parameters given for an arm (e.g. on the command line); returns them."""
    where = f"arm {arm.name!r} ({arm.method})"
    declared = METHODS[arm.method].all_params
    _check_keys(f"{where} parameters", params, declared)
    _check_values(f"{where} ", params, {k: declared[k].check for k in params})
    return params


def resolve_params(config: ExperimentConfig, arm: ArmConfig, params: dict | None = None) -> dict:
    """Every setting a run uses: method defaults ([train] for the common ones) < arm params < tuned."""
    return {**METHODS[arm.method].defaults(config.train), **arm.params, **(params or {})}


def parse_config(raw: dict, *, source: str = "config", quick: bool = False,
                 overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Validate a raw TOML dict and build the ExperimentConfig.

    quick: merge the [quick] tables over the rest first; overrides: dotted keys set last.
    """
    _check_keys(source, raw, TOP_KEYS)
    quick_raw = raw.get("quick", {})
    _check_keys(f"{source} [quick]", quick_raw, TABLES)
    if quick:
        raw = merge(raw, quick_raw)
    if overrides:
        raw = override(raw, overrides)
    name = raw.get("name")
    if checks.word(name):
        raise _err(source, f"name must be {checks.word(name)}, got {name!r}")
    if not isinstance(raw.get("description", ""), str):
        raise _err(source, "description must be a string")
    tables = {t: _check_table(source, t, raw.get(t, {})) for t in TABLES}
    for t in TABLES:  # the [quick] tables must be valid too, even when not used
        if t in quick_raw:
            _check_table(f"{source} [quick]", t, quick_raw[t])
    train = tables["train"]
    if "epochs" in train and "budget_samples" in train:
        raise _err(f"{source} [train]", "give either epochs or budget_samples, not both")
    if "epochs" not in train and "budget_samples" not in train:
        train = {**train, "epochs": 50}
    if not isinstance(tables["model"].get("options", {}), dict):
        raise _err(f"{source} [model] options", "expected a table of keyword arguments")
    arms_raw = raw.get("arms", [])
    if not isinstance(arms_raw, list) or not arms_raw:
        raise _err(source, "needs at least one [[arms]] table")
    arms = tuple(_parse_arm(source, i, a) for i, a in enumerate(arms_raw))
    names = [a.name for a in arms]
    if len(set(names)) < len(names):
        raise _err(source, f"arm names must be unique, got {names}")
    levels, noise_cfg = noise.parse_tables(source, tables, [a.name for a in arms if METHODS[a.method].records])
    final = {"reference": names[0], **tables["final"]}
    if final["reference"] not in names:
        raise _err(f"{source} [final] reference", f"must name an arm ({', '.join(names)}), got {final['reference']!r}")
    cfg = ExperimentConfig(
        name=name, description=raw.get("description", ""),
        data=DataConfig(**tables["data"]), model=ModelConfig(**tables["model"]), train=TrainConfig(**train),
        tune=TuneConfig(**tables["tune"]), final=FinalConfig(**final),
        experiment=AnalysisConfig(**{**tables["experiment"], "noise_levels": levels}),
        noise=noise_cfg, arms=arms)
    _check_sizes(source, cfg)
    return cfg


def _check_sizes(source: str, cfg: ExperimentConfig) -> None:
    """Cross-field checks: the data splits exist and evaluation points fall inside the budget."""
    d, t = cfg.data, cfg.train
    if d.num_samples % 10 or d.num_samples < 20:
        raise _err(f"{source} [data] num_samples", f"must be a multiple of 10 and >= 20, got {d.num_samples}")
    n_full, n_train, n_val = split_sizes(d.num_samples, d.val_fraction)
    if not 1 <= n_val < n_full:
        raise _err(f"{source} [data] val_fraction", f"leaves {n_val} of {n_full} training samples for validation")
    if t.epochs is not None and t.eval_every > t.epochs:
        raise _err(f"{source} [train] eval_every", f"({t.eval_every} epochs) is more than epochs ({t.epochs})")
    if t.budget_samples is not None and t.eval_every > t.budget_samples:
        raise _err(f"{source} [train] eval_every", f"({t.eval_every} samples) is more than budget_samples")
    for arm in cfg.arms:
        p = resolve_params(cfg, arm)
        if "increment" in p and p["max_samples"] < p["increment"]:
            raise _err(f"{source} arm {arm.name!r}", "max_samples must be >= increment")


def load_config(name_or_path: str | Path, *, quick: bool = False,
                overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Load a bundled experiment by name ("gasw") or a TOML file by path, validated."""
    raw, label = read_toml(name_or_path)
    return parse_config(raw, source=label, quick=quick, overrides=overrides)

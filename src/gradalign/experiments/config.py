"""Experiment configurations: TOML files parsed into typed, validated, frozen dataclasses.

A bundled experiment is one TOML file in ``gradalign/configs/`` (``load_config("gasw")``);
any other path works too. Every table rejects unknown keys with a ConfigError that lists
the valid ones, and every value is checked before any training starts.

Schema (defaults in brackets)::

    name = "gasw"                      # required; names the studies and the run folder
    description = "..."                # one line for the report
    [data]       num_samples [4000], seed [42], val_fraction [0.2], label_noise [0.0], noise_seed [0]
    [model]      kind ["mlp"|"resmlp"|"conv1d"], hidden [256], options [{}] (kind-specific kwargs)
    [train]      optimizer ["adam"|"sgd"], lr [1e-3], momentum [0.0], weight_decay [0.0],
                 batch_size [32], epochs [50] OR budget_samples, eval_every [1] (epochs, or
                 samples with budget_samples), schedule ["none"|"cosine"]
    [tune]       trials [20] (completed trials per arm), objective ["final"|"best"|"mean_last"],
                 last_k [3], sampler_seed [0], seed [1000] (training seed of every trial),
                 pruning [true] (median pruner), startup_trials [5]
    [final]      seeds [5], first_seed [0], reference [first arm] (the arm differences are taken to)
    [experiment] noise_levels [[]] (one sub-experiment per label-noise rate), gwa_mode
                 ["scratch"|"finetune"], gwa_skip_fraction [0.1], stability_last [10]
    [quick]      tables of the same shape, merged over the above by ``--quick``
    [[arms]]     name, method (baseline|gasw|gdsw|gaga|gvr|two_view), label, train_split
                 ["train_full"|"train"], params {fixed}, search {param = {low, high, log, type} |
                 {choices = [...]}}

Arm parameters (fixed or searched): lr, momentum, weight_decay, batch_size, augment (all
methods); gamma, leave_one_out (gasw, gdsw); tau, increment, max_samples, rule (gaga);
alpha, gvr_mode, gvr_layers, subset (gvr; two_view takes the same except alpha, which is 0).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from gradalign.errors import ConfigError

METHODS = ("baseline", "gasw", "gdsw", "gaga", "gvr", "two_view")
MODEL_KINDS = ("mlp", "resmlp", "conv1d")
OBJECTIVES = ("final", "best", "mean_last")
TABLES = ("data", "model", "train", "tune", "final", "experiment")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Each check returns None when the value is fine, else what is expected.
def _positive(v):
    return None if _is_num(v) and v > 0 else "a number > 0"


def _nonneg(v):
    return None if _is_num(v) and v >= 0 else "a number >= 0"


def _pos_int(v):
    return None if _is_int(v) and v >= 1 else "an integer >= 1"


def _nonneg_int(v):
    return None if _is_int(v) and v >= 0 else "an integer >= 0"


def _unit_open(v):
    return None if _is_num(v) and 0 < v < 1 else "a number in (0, 1)"


def _unit_closed(v):
    return None if _is_num(v) and 0 <= v <= 1 else "a number in [0, 1]"


def _momentum(v):
    return None if _is_num(v) and 0 <= v < 1 else "a number in [0, 1)"


def _bool(v):
    return None if isinstance(v, bool) else "true or false"


def _number(v):
    return None if _is_num(v) else "a finite number"


def _one_of(*options):
    return lambda v: None if v in options else "one of " + ", ".join(map(repr, options))


# Arm parameters: name -> check. Which methods take which is in METHOD_PARAMS.
PARAM_CHECKS = {
    "lr": _positive, "momentum": _momentum, "weight_decay": _nonneg, "batch_size": _pos_int,
    "augment": _bool, "gamma": _nonneg, "leave_one_out": _bool, "tau": _number,
    "increment": _pos_int, "max_samples": _pos_int, "rule": _one_of("mean_snr", "per_sample"),
    "alpha": _nonneg, "gvr_mode": _one_of("auto", "autograd", "closed_form"),
    "gvr_layers": _one_of("head", "last_stage"), "subset": _pos_int,
}
_COMMON = ("lr", "momentum", "weight_decay", "batch_size", "augment")
_GVR = ("gvr_mode", "gvr_layers", "subset")
METHOD_PARAMS = {
    "baseline": _COMMON,
    "gasw": _COMMON + ("gamma", "leave_one_out"),
    "gdsw": _COMMON + ("gamma", "leave_one_out"),
    "gaga": _COMMON + ("tau", "increment", "max_samples", "rule"),
    "gvr": _COMMON + ("alpha",) + _GVR,
    "two_view": _COMMON + _GVR,
}


@dataclass(frozen=True)
class DataConfig:
    num_samples: int = 4000
    seed: int = 42
    val_fraction: float = 0.2
    label_noise: float = 0.0
    noise_seed: int = 0


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

    @property
    def x_axis(self) -> str:
        """The column curves are plotted against: "samples" or "epoch"."""
        return "samples" if self.budget_samples is not None else "epoch"


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
    reference: str | None = None


@dataclass(frozen=True)
class AnalysisConfig:
    noise_levels: tuple = ()
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
    arms: tuple = ()
    variant: str = ""

    def arm(self, name: str) -> ArmConfig:
        for a in self.arms:
            if a.name == name:
                return a
        raise ConfigError(f"no arm named {name!r}; arms: {', '.join(a.name for a in self.arms)}")

    @property
    def reference(self) -> str:
        """The arm that paired differences are taken against."""
        return self.final.reference or self.arms[0].name

    def variants(self) -> list[ExperimentConfig]:
        """One config per label-noise level in [experiment] noise_levels, else [self]."""
        if not self.experiment.noise_levels:
            return [self]
        return [replace(self, data=replace(self.data, label_noise=float(r)), variant=f"noise{r:g}")
                for r in self.experiment.noise_levels]

    def arm_hash(self, arm: ArmConfig, *, tuning: bool = False) -> str:
        """Hash of everything that decides an arm's runs: data, model, train and the arm; with
        tuning=True also the tuning settings that decide its trials (not their number)."""
        parts = {"data": asdict(self.data), "model": asdict(self.model), "train": asdict(self.train),
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
    "data": {"num_samples": _pos_int, "seed": _nonneg_int, "val_fraction": _unit_open,
             "label_noise": _unit_closed, "noise_seed": _nonneg_int},
    "model": {"kind": _one_of(*MODEL_KINDS), "hidden": _pos_int, "options": None},
    "train": {"optimizer": _one_of("adam", "sgd"), "lr": _positive, "momentum": _momentum,
              "weight_decay": _nonneg, "batch_size": _pos_int, "epochs": _pos_int,
              "budget_samples": _pos_int, "eval_every": _pos_int, "schedule": _one_of("none", "cosine")},
    "tune": {"trials": _nonneg_int, "objective": _one_of(*OBJECTIVES), "last_k": _pos_int,
             "sampler_seed": _nonneg_int, "seed": _nonneg_int, "pruning": _bool, "startup_trials": _nonneg_int},
    "final": {"seeds": _pos_int, "first_seed": _nonneg_int, "reference": None},
    "experiment": {"noise_levels": None, "gwa_mode": _one_of("scratch", "finetune"),
                   "gwa_skip_fraction": lambda v: None if _is_num(v) and 0 <= v < 1 else "a number in [0, 1)",
                   "stability_last": _pos_int},
}
_TOP = ("name", "description", "quick", "arms") + TABLES
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


def _check_table(src: str, name: str, table: dict) -> dict:
    spec = _SPECS[name]
    _check_keys(f"{src} [{name}]", table, list(spec))
    for key, value in table.items():
        check = spec[key]
        problem = check(value) if check else None
        if problem:
            raise _err(f"{src} [{name}] {key}", f"expected {problem}, got {value!r}")
    return table


def merge(base: dict, over: dict) -> dict:
    """Deep merge of plain dicts: tables merge key by key, other values replace."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys, e.g. {"train.epochs": 2, "arms.gasw.params.gamma": 1.0}."""
    raw = copy.deepcopy(raw)
    for path, value in overrides.items():
        parts = path.split(".")
        node = raw
        if parts[0] == "arms":
            if len(parts) < 3:
                raise ConfigError(f"override {path!r}: use arms.<arm name>.<key>")
            arms = {a.get("name"): a for a in raw.get("arms", [])}
            if parts[1] not in arms:
                raise ConfigError(f"override {path!r}: no arm {parts[1]!r}; arms: {', '.join(map(str, arms))}")
            node, parts = arms[parts[1]], parts[2:]
        elif parts[0] not in _TOP or len(parts) == 1 and parts[0] in TABLES:
            raise ConfigError(f"override {path!r}: the first part must be one of "
                              f"{', '.join(TABLES)}, name, description or arms.<name>")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {path!r}: {p!r} is not a table")
        node[parts[-1]] = value
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """'train.epochs=3' -> ("train.epochs", 3); values are TOML, bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. train.epochs=3), got {text!r}")
    key, value = (s.strip() for s in text.split("=", 1))
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key, parsed


def _parse_search(where: str, name: str, spec) -> SearchParam:
    if not isinstance(spec, dict):
        raise _err(where, "expected a table like {low = 1e-4, high = 1e-2, log = true} or {choices = [...]}")
    _check_keys(where, spec, _SEARCH_KEYS)
    check = PARAM_CHECKS[name]
    if "choices" in spec:
        extra = sorted(set(spec) - {"choices", "type"})
        if extra or not isinstance(spec["choices"], list) or not spec["choices"]:
            raise _err(where, "choices must be a non-empty list and comes without low/high/log")
        for c in spec["choices"]:
            if check(c):
                raise _err(where, f"choice {c!r} is not {check(c)}")
        return SearchParam(name, "categorical", choices=tuple(spec["choices"]))
    kind = spec.get("type", "int" if name in ("batch_size", "increment", "max_samples", "subset") else "float")
    if kind not in ("float", "int"):
        raise _err(where, f"type must be 'float' or 'int', got {kind!r}")
    if "low" not in spec or "high" not in spec:
        raise _err(where, "needs low and high")
    low, high, log = spec["low"], spec["high"], spec.get("log", False)
    for bound in (low, high):
        problem = check(bound) if kind == "float" or _is_int(bound) else "an integer"
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
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise _err(where, f"name must be a non-empty word of letters, digits, _ or -, got {name!r}")
    where = f"{src} arm {name!r}"
    if method not in METHODS:
        raise _err(where, f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if raw.get("train_split", "train_full") not in ("train_full", "train"):
        raise _err(where, f"train_split must be 'train_full' or 'train', got {raw['train_split']!r}")
    if not isinstance(raw.get("label", ""), str):
        raise _err(where, "label must be a string")
    valid = METHOD_PARAMS[method]
    params = raw.get("params", {})
    _check_keys(f"{where} params", params, valid)
    for key, value in params.items():
        problem = PARAM_CHECKS[key](value)
        if problem:
            raise _err(f"{where} params.{key}", f"expected {problem}, got {value!r}")
    search = raw.get("search", {})
    _check_keys(f"{where} search", search, valid)
    both = sorted(set(params) & set(search))
    if both:
        raise _err(where, f"{', '.join(both)} is both fixed (params) and searched (search); keep one")
    space = tuple(_parse_search(f"{where} search.{k}", k, v) for k, v in search.items())
    return ArmConfig(name, method, raw.get("label", ""), raw.get("train_split", "train_full"), dict(params), space)


def check_params(arm: ArmConfig, params: dict) -> dict:
    """Validate parameters given for an arm (e.g. on the command line); returns them."""
    where = f"arm {arm.name!r} ({arm.method})"
    _check_keys(f"{where} parameters", params, METHOD_PARAMS[arm.method])
    for key, value in params.items():
        problem = PARAM_CHECKS[key](value)
        if problem:
            raise _err(f"{where} {key}", f"expected {problem}, got {value!r}")
    return params


def parse_config(raw: dict, *, source: str = "config", quick: bool = False,
                 overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Validate a raw TOML dict and build the ExperimentConfig.

    quick: merge the [quick] tables over the rest first; overrides: dotted keys set last.
    """
    _check_keys(source, raw, _TOP)
    quick_raw = raw.get("quick", {})
    _check_keys(f"{source} [quick]", quick_raw, TABLES)
    if quick:
        raw = merge(raw, quick_raw)
    if overrides:
        raw = apply_overrides(raw, overrides)
    name = raw.get("name")
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise _err(source, f"name must be a non-empty word of letters, digits, _ or -, got {name!r}")
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
    levels = tables["experiment"].get("noise_levels", [])
    if not isinstance(levels, list) or any(_unit_closed(v) for v in levels) or len(set(levels)) < len(levels):
        raise _err(f"{source} [experiment] noise_levels", f"expected a list of distinct rates in [0, 1], got {levels!r}")
    arms_raw = raw.get("arms", [])
    if not isinstance(arms_raw, list) or not arms_raw:
        raise _err(source, "needs at least one [[arms]] table")
    arms = tuple(_parse_arm(source, i, a) for i, a in enumerate(arms_raw))
    names = [a.name for a in arms]
    if len(set(names)) < len(names):
        raise _err(source, f"arm names must be unique, got {names}")
    ref = tables["final"].get("reference")
    if ref is not None and ref not in names:
        raise _err(f"{source} [final] reference", f"must name an arm ({', '.join(names)}), got {ref!r}")
    cfg = ExperimentConfig(
        name=name, description=raw.get("description", ""),
        data=DataConfig(**tables["data"]), model=ModelConfig(**tables["model"]), train=TrainConfig(**train),
        tune=TuneConfig(**tables["tune"]), final=FinalConfig(**tables["final"]),
        experiment=AnalysisConfig(**{**tables["experiment"], "noise_levels": tuple(float(v) for v in levels)}),
        arms=arms)
    _check_sizes(source, cfg)
    return cfg


def _check_sizes(source: str, cfg: ExperimentConfig) -> None:
    """Cross-field checks: the data splits exist and evaluation points fall inside the budget."""
    d, t = cfg.data, cfg.train
    if d.num_samples % 10 or d.num_samples < 20:
        raise _err(f"{source} [data] num_samples", f"must be a multiple of 10 and >= 20, got {d.num_samples}")
    n_train = int(d.num_samples * 0.8)
    n_val = round(d.val_fraction * n_train)
    if not 1 <= n_val < n_train:
        raise _err(f"{source} [data] val_fraction", f"leaves {n_val} of {n_train} training samples for validation")
    if t.epochs is not None and t.eval_every > t.epochs:
        raise _err(f"{source} [train] eval_every", f"({t.eval_every} epochs) is more than epochs ({t.epochs})")
    if t.budget_samples is not None and t.eval_every > t.budget_samples:
        raise _err(f"{source} [train] eval_every", f"({t.eval_every} samples) is more than budget_samples")
    for arm in cfg.arms:
        p = arm.params
        if p.get("max_samples", 512) < p.get("increment", 32):
            raise _err(f"{source} arm {arm.name!r}", "max_samples must be >= increment")


def bundled_names() -> list[str]:
    """Names of the experiments shipped in gradalign/configs."""
    root = resources.files("gradalign") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def read_toml(name_or_path: str | Path) -> tuple[dict, str]:
    """The raw dict of a bundled experiment name or a TOML path, and a label for messages."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        text, label = path.read_text(), str(path)
    else:
        names = bundled_names()
        if str(name_or_path) not in names:
            raise ConfigError(f"unknown experiment {str(name_or_path)!r}: give a bundled name "
                              f"({', '.join(names)}) or a path to a .toml file")
        text = (resources.files("gradalign") / "configs" / f"{name_or_path}.toml").read_text()
        label = f"{name_or_path}.toml"
    try:
        return tomllib.loads(text), label
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{label}: not valid TOML: {e}") from None


def load_config(name_or_path: str | Path, *, quick: bool = False,
                overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Load a bundled experiment by name ("gasw") or a TOML file by path, validated."""
    raw, label = read_toml(name_or_path)
    return parse_config(raw, source=label, quick=quick, overrides=overrides)

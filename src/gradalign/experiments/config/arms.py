"""The [[arms]] tables of an experiment: arm configurations, their Optuna search spaces, and
the parameters a run resolves to (method defaults < [train] < arm params < tuned values)."""
from __future__ import annotations

from dataclasses import dataclass, field

from gradalign.experiments import checks
from gradalign.experiments.method_table import METHODS
from gradalign.experiments.checks import check_keys as _check_keys, check_values as _check_values
from gradalign.experiments.checks import config_error as _err

_ARM_KEYS = ("name", "method", "label", "train_split", "params", "search")
_SEARCH_KEYS = ("low", "high", "log", "type", "choices")


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


def parse_search(where: str, param, spec) -> SearchParam:
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


def parse_arm(src: str, index: int, raw) -> ArmConfig:
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
    space = tuple(parse_search(f"{where} search.{k}", declared[k], v) for k, v in search.items())
    return ArmConfig(name, method, raw.get("label", ""), raw.get("train_split", "train_full"), dict(params), space)


def check_params(arm: ArmConfig, params: dict) -> dict:
    """Validate parameters given for an arm (e.g. on the command line); returns them."""
    where = f"arm {arm.name!r} ({arm.method})"
    declared = METHODS[arm.method].all_params
    _check_keys(f"{where} parameters", params, declared)
    _check_values(f"{where} ", params, {k: declared[k].check for k in params})
    return params


def resolve_params(config, arm: ArmConfig, params: dict | None = None) -> dict:
    """Every setting a run uses: method defaults ([train] for the common ones) < arm params < tuned."""
    return {**METHODS[arm.method].defaults(config.train), **arm.params, **(params or {})}

"""Experiment configurations: TOML files parsed into typed, validated, frozen dataclasses.

A bundled experiment is one TOML file in ``gradalign/configs/`` (``load_config("gasw")``);
any other path works too (config_sources.py reads it). Every table rejects unknown keys with
a ConfigError that lists the valid ones, and every value is checked before training starts.

Schema (defaults in brackets)::

    name = "gasw"                      # required; names the studies and the run folder
    description = "..."                # one line for the report
    [data]       dataset ["mnist1d"|"cifar10"|"cifar100"], seed [42], val_fraction [0.2],
                 label_noise [0.0], noise_seed [0]; mnist1d: num_samples [4000]; CIFAR (read
                 from --data-dir, cifar.py): train_size [0 = all], test_size [0 = all] (stratified
                 subsets), augmentation (augment.py) normalize ["dataset"|"symmetric"],
                 crop_padding [4], flip [true], cutout [16] (0: off), cutout_p [0.5]
    [model]      kind ["mlp"|"resmlp"|"conv1d" for mnist1d; "resnet18"|"vit"|"convnext" for CIFAR],
                 hidden [256] (1-D models), options [{}] (kind-specific kwargs, models.build_model)
    [train]      optimizer ["adam"|"sgd"], lr [1e-3], momentum [0.0], weight_decay [0.0],
                 batch_size [32], epochs [50] OR budget_samples, eval_every [1] (epochs, or
                 samples with budget_samples), schedule ["none"|"cosine" (per step, over the
                 budget)|"cosine_epoch" (per epoch, torch's CosineAnnealingLR with T_max = epochs)],
                 precision ["auto" (bf16 autocast on a GPU that supports it, else fp32)|"fp32"|"bf16"]
    [tune]       trials [20] (completed trials per arm), objective ["final"|"best"|"mean_last"],
                 last_k [3], sampler_seed [0], seed [1000] (training seed of every trial),
                 pruning [true] (median pruner), startup_trials [5]
    [final]      seeds [5], first_seed [0], reference [first arm] (the arm differences are taken to)
    [experiment] noise_levels [[]] (one sub-experiment per label-noise rate), gwa_mode
                 ["scratch"|"finetune"], gwa_skip_fraction [0.1], stability_last [10]
    [variants.<name>]  tables data, model, train, experiment merged over the above: one
                 sub-experiment per name, with its own runs and report section (gwa-cifar10:
                 ViT and ConvNeXt); --set values still apply to every variant
    [quick]      tables of the same shape (variants included), merged over the above by ``--quick``
    [[arms]]     name, method (a name in arms.METHODS), label, train_split ["train_full"|"train"],
                 params {fixed}, search {param = {low, high, log, type} | {choices = [...]}}

Arm parameters (fixed or searched) are the method's, as declared in arms.METHODS: lr,
momentum, weight_decay, batch_size, augment (every method); gamma, leave_one_out (gasw,
gdsw); tau, increment, max_samples, rule (gaga); alpha, gvr_mode, gvr_layers, subset,
subset_forward (gvr; two_view takes the same except alpha, which is 0).

An arm's runs are keyed by a hash of what decides them (``arm_hash``); keys added after a
run folder was made are left out of it at their defaults (``identity()``), so such folders
stay valid.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from gradalign.errors import ConfigError
from gradalign.experiments import checks
from gradalign.experiments.checks import check_keys as _check_keys, check_values as _check_values
from gradalign.experiments.checks import config_error as _err
from gradalign.experiments.augment import NORMALIZE
from gradalign.experiments.cifar import DATASETS
from gradalign.experiments.config_arms import (  # noqa: F401  (SearchParam, check_params: re-exported)
    ArmConfig, SearchParam, check_params, parse_arm, resolve_params)
from gradalign.experiments.config_sources import apply_overrides, merge, read_toml
from gradalign.experiments.data import data_sizes
from gradalign.experiments.models import MODELS, SIGNAL_MODELS

OBJECTIVES = ("final", "best", "mean_last")
TABLES = ("data", "model", "train", "tune", "final", "experiment")
VARIANT_TABLES = ("data", "model", "train", "experiment")
_MNIST1D_KEYS = ("num_samples", "seed", "val_fraction", "label_noise", "noise_seed")


@dataclass(frozen=True)
class DataConfig:
    num_samples: int = 4000
    seed: int = 42
    val_fraction: float = 0.2
    label_noise: float = 0.0
    noise_seed: int = 0
    dataset: str = "mnist1d"
    train_size: int = 0
    test_size: int = 0
    normalize: str = "dataset"
    crop_padding: int = 4
    flip: bool = True
    cutout: int = 16
    cutout_p: float = 0.5

    def identity(self) -> dict:
        """The keys that decide the data: mnist1d's five, or every key but num_samples for CIFAR."""
        d = asdict(self)
        if self.dataset == "mnist1d":
            return {k: d[k] for k in _MNIST1D_KEYS}
        return {k: v for k, v in d.items() if k != "num_samples"}


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
    precision: str = "auto"

    def identity(self) -> dict:
        """Every key, precision left out at its default "auto" (device-dependent by design)."""
        return {k: v for k, v in asdict(self).items() if not (k == "precision" and v == "auto")}

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
    noise_levels: tuple = ()
    gwa_mode: str = "scratch"
    gwa_skip_fraction: float = 0.1
    stability_last: int = 10


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
    variant_configs: tuple = ()   # the [variants.<name>] sub-experiments, parsed

    def arm(self, name: str) -> ArmConfig:
        for a in self.arms:
            if a.name == name:
                return a
        raise ConfigError(f"no arm named {name!r}; arms: {', '.join(a.name for a in self.arms)}")

    def variants(self) -> list[ExperimentConfig]:
        """The sub-experiments: one per [variants.<name>] (else self), each split into one per
        label-noise level in its [experiment] noise_levels ("noise0.1", or "<name>-noise0.1")."""
        out = []
        for base in self.variant_configs or (self,):
            levels = base.experiment.noise_levels
            out += [replace(base, data=replace(base.data, label_noise=float(r)),
                            variant="-".join(filter(None, (base.variant, f"noise{r:g}")))) for r in levels] or [base]
        return out

    def arm_hash(self, arm: ArmConfig, *, tuning: bool = False) -> str:
        """Hash of everything that decides an arm's runs: data, model, train and the arm; with
        tuning=True also the tuning settings that decide its trials (not their number)."""
        parts = {"data": self.data.identity(), "model": asdict(self.model), "train": self.train.identity(),
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
             "label_noise": checks.unit_closed, "noise_seed": checks.nonneg_int, "dataset": checks.one_of(*DATASETS),
             "train_size": checks.nonneg_int, "test_size": checks.nonneg_int, "normalize": checks.one_of(*NORMALIZE),
             "crop_padding": checks.nonneg_int, "flip": checks.boolean, "cutout": checks.nonneg_int,
             "cutout_p": checks.unit_closed},
    "model": {"kind": checks.one_of(*MODELS), "hidden": checks.pos_int, "options": None},
    "train": {"optimizer": checks.one_of("adam", "sgd"), "lr": checks.positive, "momentum": checks.unit_right_open,
              "weight_decay": checks.nonneg, "batch_size": checks.pos_int, "epochs": checks.pos_int,
              "budget_samples": checks.pos_int, "eval_every": checks.pos_int,
              "schedule": checks.one_of("none", "cosine", "cosine_epoch"),
              "precision": checks.one_of("auto", "fp32", "bf16")},
    "tune": {"trials": checks.nonneg_int, "objective": checks.one_of(*OBJECTIVES), "last_k": checks.pos_int,
             "sampler_seed": checks.nonneg_int, "seed": checks.nonneg_int, "pruning": checks.boolean,
             "startup_trials": checks.nonneg_int},
    "final": {"seeds": checks.pos_int, "first_seed": checks.nonneg_int, "reference": None},
    "experiment": {"noise_levels": None, "gwa_mode": checks.one_of("scratch", "finetune"),
                   "gwa_skip_fraction": checks.unit_right_open, "stability_last": checks.pos_int},
}
TOP_KEYS = ("name", "description", "quick", "arms", "variants") + TABLES


def _check_table(src: str, name: str, table: dict) -> dict:
    spec = _SPECS[name]
    _check_keys(f"{src} [{name}]", table, list(spec))
    _check_values(f"{src} [{name}] ", table, spec)
    return table


def override(raw: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys of a raw config, e.g. {"train.epochs": 2, "arms.gasw.params.gamma": 1.0}."""
    return apply_overrides(raw, overrides, tables=TABLES, top_keys=TOP_KEYS)


def parse_config(raw: dict, *, source: str = "config", quick: bool = False,
                 overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Validate a raw TOML dict and build the ExperimentConfig.

    quick: merge the [quick] tables over the rest first; overrides: dotted keys set last.
    """
    _check_keys(source, raw, TOP_KEYS)
    quick_raw = raw.get("quick", {})
    _check_keys(f"{source} [quick]", quick_raw, TABLES + ("variants",))
    if quick:
        raw = merge(raw, quick_raw)
    if overrides:
        raw = override(raw, overrides)
    cfg = _parse_one(raw, source, quick_raw)
    variants = raw.get("variants", {})
    _check_keys(f"{source} [variants]", variants, list(variants))
    if not variants:
        return cfg
    base = {k: v for k, v in raw.items() if k not in ("variants", "quick")}
    common = {k: v for k, v in (overrides or {}).items() if not k.startswith("variants.")}
    subs = []
    for name, tables in variants.items():
        where = f"{source} [variants.{name}]"
        if checks.word(name):
            raise _err(where, f"a variant name must be {checks.word(name)}")
        _check_keys(where, tables, VARIANT_TABLES)
        merged = merge(base, tables)
        subs.append(replace(_parse_one(override(merged, common) if common else merged, where, {}), variant=name))
    return replace(cfg, variant_configs=tuple(subs))


def _parse_one(raw: dict, source: str, quick_raw: dict) -> ExperimentConfig:
    """The ExperimentConfig of one raw dict (its [variants] aside)."""
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
    levels = tables["experiment"].get("noise_levels", [])
    if not isinstance(levels, list) or any(checks.unit_closed(v) for v in levels) or len(set(levels)) < len(levels):
        raise _err(f"{source} [experiment] noise_levels", f"expected a list of distinct rates in [0, 1], got {levels!r}")
    arms_raw = raw.get("arms", [])
    if not isinstance(arms_raw, list) or not arms_raw:
        raise _err(source, "needs at least one [[arms]] table")
    arms = tuple(parse_arm(source, i, a) for i, a in enumerate(arms_raw))
    names = [a.name for a in arms]
    if len(set(names)) < len(names):
        raise _err(source, f"arm names must be unique, got {names}")
    final = {"reference": names[0], **tables["final"]}
    if final["reference"] not in names:
        raise _err(f"{source} [final] reference", f"must name an arm ({', '.join(names)}), got {final['reference']!r}")
    cfg = ExperimentConfig(
        name=name, description=raw.get("description", ""),
        data=DataConfig(**tables["data"]), model=ModelConfig(**tables["model"]), train=TrainConfig(**train),
        tune=TuneConfig(**tables["tune"]), final=FinalConfig(**final),
        experiment=AnalysisConfig(**{**tables["experiment"], "noise_levels": tuple(float(v) for v in levels)}),
        arms=arms)
    _check_sizes(source, cfg)
    return cfg


def _check_sizes(source: str, cfg: ExperimentConfig) -> None:
    """Cross-field checks: the model fits the data, the data splits exist and evaluation points
    fall inside the budget."""
    d, t = cfg.data, cfg.train
    signal = d.dataset == "mnist1d"
    if (cfg.model.kind in SIGNAL_MODELS) != signal:
        fits = ", ".join(k for k in MODELS if (k in SIGNAL_MODELS) == signal)
        raise _err(f"{source} [model] kind", f"{cfg.model.kind!r} does not take {d.dataset} inputs; use {fits}")
    if signal and (d.num_samples % 10 or d.num_samples < 20):
        raise _err(f"{source} [data] num_samples", f"must be a multiple of 10 and >= 20, got {d.num_samples}")
    n_full, n_train, n_val = data_sizes(d)
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

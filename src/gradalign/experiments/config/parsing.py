"""Parsing an experiment file: a raw TOML dict (sources.py) checked table by table, key by key,
into the frozen dataclasses of schema.py; every error is a ConfigError naming the file, table
and key, and listing the valid keys."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from gradalign.experiments import checks
from gradalign.experiments.checks import check_keys as _check_keys, check_values as _check_values
from gradalign.experiments.checks import config_error as _err
from gradalign.experiments.config import noise_table
from gradalign.experiments.config.arms import parse_arm, resolve_params
from gradalign.experiments.config.schema import (ExperimentSettings, DataConfig, ExperimentConfig, FinalConfig,
                                                 ModelConfig, TrainConfig, TuneConfig)
from gradalign.experiments.config.sources import apply_overrides, merge, read_toml
from gradalign.experiments.data.label_noise import NOISE_KINDS
from gradalign.experiments.data.pipelines import NORMALIZE
from gradalign.experiments.data.sources import DATASETS, data_sizes
from gradalign.experiments.method_table import METHODS
from gradalign.experiments.models import MODELS, MODELS_1D

OBJECTIVES = ("final", "best", "mean_last")
TABLES = ("data", "model", "train", "tune", "final", "experiment", "noise")
VARIANT_TABLES = ("data", "model", "train", "experiment")
_SPECS = {  # table -> {key: check}; an entry None means "validated elsewhere"
    "data": {"num_samples": checks.pos_int, "seed": checks.nonneg_int, "val_fraction": checks.unit_open,
             "label_noise": checks.unit_closed, "noise_seed": checks.nonneg_int,
             "noise_kind": checks.one_of(*NOISE_KINDS), "dataset": checks.one_of(*DATASETS),
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
    "noise": dict.fromkeys(noise_table.KEYS),
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
    arms_raw = raw.get("arms", [])
    if not isinstance(arms_raw, list) or not arms_raw:
        raise _err(source, "needs at least one [[arms]] table")
    arms = tuple(parse_arm(source, i, a) for i, a in enumerate(arms_raw))
    names = [a.name for a in arms]
    if len(set(names)) < len(names):
        raise _err(source, f"arm names must be unique, got {names}")
    levels, noise_cfg = noise_table.parse_tables(source, tables, [a.name for a in arms if METHODS[a.method].records])
    final = {"reference": names[0], **tables["final"]}
    if final["reference"] not in names:
        raise _err(f"{source} [final] reference", f"must name an arm ({', '.join(names)}), got {final['reference']!r}")
    cfg = ExperimentConfig(
        name=name, description=raw.get("description", ""),
        data=DataConfig(**tables["data"]), model=ModelConfig(**tables["model"]), train=TrainConfig(**train),
        tune=TuneConfig(**tables["tune"]), final=FinalConfig(**final),
        experiment=ExperimentSettings(**{**tables["experiment"], "noise_levels": levels}),
        noise=noise_cfg, arms=arms)
    _check_sizes(source, cfg)
    return cfg


def _check_sizes(source: str, cfg: ExperimentConfig) -> None:
    """Cross-field checks: the model fits the data, the data splits exist and evaluation points
    fall inside the budget."""
    d, t = cfg.data, cfg.train
    one_d = d.dataset == "mnist1d"
    if (cfg.model.kind in MODELS_1D) != one_d:
        fits = ", ".join(k for k in MODELS if (k in MODELS_1D) == one_d)
        raise _err(f"{source} [model] kind", f"{cfg.model.kind!r} does not take {d.dataset} inputs; use {fits}")
    if one_d and (d.num_samples % 10 or d.num_samples < 20):
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

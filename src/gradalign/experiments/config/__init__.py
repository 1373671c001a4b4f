"""Experiment configurations: TOML files parsed into typed, validated, frozen dataclasses.

    schema.py       the dataclasses (ExperimentConfig and its tables) and the schema of the file
    parsing.py      raw dict -> ExperimentConfig, every value checked (parse_config, load_config)
    arms.py         the [[arms]] tables: ArmConfig, search spaces, parameter resolution
    noise_table.py  the [noise] table (NoiseConfig) and the noise settings of a config
    sources.py      where a raw config comes from (a bundled name or a path) and --set overrides
"""
from gradalign.experiments.config.arms import ArmConfig, SearchParam, check_params, parse_arm, resolve_params
from gradalign.experiments.config.noise_table import NoiseConfig
from gradalign.experiments.config.parsing import TABLES, load_config, override, parse_config
from gradalign.experiments.config.schema import (ExperimentSettings, DataConfig, ExperimentConfig, FinalConfig,
                                                 ModelConfig, TrainConfig, TuneConfig)
from gradalign.experiments.config.sources import apply_overrides, bundled_names, merge, parse_override, read_toml

__all__ = ["ExperimentSettings", "ArmConfig", "DataConfig", "ExperimentConfig", "FinalConfig", "ModelConfig", "NoiseConfig",
           "SearchParam", "TABLES", "TrainConfig", "TuneConfig", "apply_overrides", "bundled_names", "check_params",
           "load_config", "merge", "override", "parse_arm", "parse_config", "parse_override", "read_toml",
           "resolve_params"]

"""Experiment configurations: TOML files parsed into typed, validated, frozen dataclasses.

A bundled experiment is one TOML file in ``gradalign/configs/`` (``load_config("gasw")``);
any other path works too (config_sources.py reads it). Every table rejects unknown keys with
a ConfigError that lists the valid ones, and every value is checked before training starts.

Schema (defaults in brackets)::

    name = "gasw"                      # required; names the studies and the run folder
    description = "..."                # one line for the report
    [data]       dataset ["mnist1d"|"cifar10"|"cifar100"], seed [42], val_fraction [0.2],
                 label_noise [0.0], noise_seed [0], noise_kind ["symmetric"|"pair"] (data/label_noise.py);
                 mnist1d: num_samples [4000]; CIFAR (read from --data-dir, cifar.py): train_size
                 [0 = all], test_size [0 = all] (stratified subsets), augmentation (data/pipelines.py)
                 normalize ["dataset"|"symmetric"], crop_padding [4], flip [true], cutout [16]
                 (0: off), cutout_p [0.5]
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
    [experiment] noise_levels [[]] (one sub-experiment per level: a rate for symmetric noise, or
                 "KIND:RATE", e.g. "pair:0.2"; data/label_noise.py), gwa_mode
                 ["scratch"|"finetune"], gwa_skip_fraction [0.1], stability_last [10]
    [noise]      signals_arm, reference_signal ["loss"], drop_fractions [[]], drop_signals,
                 oracle [true]: the label-noise analysis (noise_table.NoiseConfig)
    [variants.<name>]  tables data, model, train, experiment merged over the above: one
                 sub-experiment per name, with its own runs and report section (gwa-cifar10:
                 ViT and ConvNeXt); --set values still apply to every variant
    [quick]      tables of the same shape (variants included), merged over the above by ``--quick``
    [[arms]]     name, method (a name in the method table, method_table.METHODS), label, train_split ["train_full"|"train"],
                 params {fixed}, search {param = {low, high, log, type} | {choices = [...]}}

Arm parameters (fixed or searched) are the method's, as declared in the method table: lr,
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

from gradalign.errors import ConfigError
from gradalign.experiments.config.arms import ArmConfig
from gradalign.experiments.config.noise_table import NoiseConfig
from gradalign.experiments.data.label_noise import parse_level

_MNIST1D_KEYS = ("num_samples", "seed", "val_fraction", "label_noise", "noise_seed", "noise_kind")


@dataclass(frozen=True)
class DataConfig:
    num_samples: int = 4000
    seed: int = 42
    val_fraction: float = 0.2
    label_noise: float = 0.0
    noise_seed: int = 0
    noise_kind: str = "symmetric"
    dataset: str = "mnist1d"
    train_size: int = 0
    test_size: int = 0
    normalize: str = "dataset"
    crop_padding: int = 4
    flip: bool = True
    cutout: int = 16
    cutout_p: float = 0.5

    def identity(self) -> dict:
        """The keys that decide the data: mnist1d's, or every key but num_samples for CIFAR;
        noise_kind only when it is not the default (run folders made before it existed stay valid)."""
        d = asdict(self)
        keys = _MNIST1D_KEYS if self.dataset == "mnist1d" else [k for k in d if k != "num_samples"]
        return {k: d[k] for k in keys if (k, d[k]) != ("noise_kind", "symmetric")}


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
class ExperimentSettings:
    noise_levels: tuple = ()      # canonical entries: a rate (symmetric) or "KIND:RATE"
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
    experiment: ExperimentSettings = ExperimentSettings()
    noise: NoiseConfig = NoiseConfig()
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
        level in its [experiment] noise_levels ("noise0.1", "pair0.2", or "<name>-noise0.1")."""
        out = []
        for base in self.variant_configs or (self,):
            levels = [parse_level(entry) for entry in base.experiment.noise_levels]
            out += [replace(base, data=replace(base.data, label_noise=lv.rate, noise_kind=lv.kind),
                            variant="-".join(filter(None, (base.variant, lv.variant)))) for lv in levels] or [base]
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

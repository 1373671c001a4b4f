"""Label noise: the noise models, how an experiment names its noise levels, the [noise] table,
and how much of the noise a trained model memorised.

Noise kinds (``[data] noise_kind``, or per sub-experiment in ``[experiment] noise_levels``)::

    symmetric   each flipped sample gets a label drawn uniformly from the C - 1 other classes
    pair        class c becomes class (c + 1) mod C: each class is flipped to one fixed other
                class ("pair flipping", Han et al. 2018, Co-teaching)

Both flip exactly ``round(rate * N)`` training samples, chosen uniformly at random from
``noise_seed``. For the same noise_seed and rate the two kinds flip the SAME samples and
differ only in the new label, so their results are paired too. Pair noise needs rate < 0.5:
at 0.5 a class holds as many samples of the next class labelled as it as of its own.

``[experiment] noise_levels`` entries: a rate (symmetric noise) or the string "KIND:RATE",
e.g. ``noise_levels = [0.0, 0.2, 0.4, "pair:0.2"]``. A level becomes a sub-experiment
("variant") named ``noise0.2`` (symmetric) or ``pair0.2`` (pair); a rate of 0 is the same
clean data whatever the kind, so "pair:0" means ``noise0``.

The [noise] table (``NoiseConfig``) says how the report analyses the noise: which arm's
runs record per-sample signals (signals.py), the reference signal for paired differences,
and the clean-and-retrain grid (clean.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from gradalign.errors import ConfigError
from gradalign.experiments.detection import SIGNAL_NAMES

NOISE_KINDS = ("symmetric", "pair")
_PREFIX = {"symmetric": "noise", "pair": "pair"}       # variant name = prefix + rate


class NoiseLevel(NamedTuple):
    """One noise setting: its kind and rate."""

    kind: str
    rate: float

    @property
    def variant(self) -> str:
        """The sub-experiment's name: noise0.2 (symmetric) or pair0.2."""
        return f"{_PREFIX[self.kind]}{self.rate:g}"

    @property
    def spec(self) -> float | str:
        """The canonical config entry: the rate for symmetric noise, else "KIND:RATE"."""
        return self.rate if self.kind == "symmetric" else f"{self.kind}:{self.rate:g}"


def check_rate(kind: str, rate) -> str | None:
    """None when `rate` is valid for noise of `kind`, else what was expected."""
    if kind not in NOISE_KINDS:
        return f"a noise kind in {', '.join(NOISE_KINDS)}, got {kind!r}"
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
        return f"a rate in [0, 1], got {rate!r}"
    if kind == "pair" and rate >= 0.5:
        return f"a pair-noise rate below 0.5 (at 0.5 a class is as often mislabelled as not), got {rate!r}"
    return None


def parse_level(entry) -> NoiseLevel:
    """A noise_levels entry (a rate, or "KIND:RATE") as a NoiseLevel; ValueError says what is wrong."""
    if isinstance(entry, str):
        kind, sep, text = entry.partition(":")
        kind = kind.strip()
        try:
            rate = float(text) if sep else None
        except ValueError:
            rate = None
        if rate is None:
            raise ValueError(f"{entry!r} is not a rate or 'KIND:RATE' (KIND one of {', '.join(NOISE_KINDS)}), "
                             "e.g. 0.2 or 'pair:0.2'")
    else:
        kind, rate = "symmetric", entry
    problem = check_rate(kind, rate)
    if problem:
        raise ValueError(f"{entry!r}: expected {problem}")
    return NoiseLevel("symmetric" if rate == 0 else kind, float(rate))


def parse_levels(entries) -> tuple[NoiseLevel, ...]:
    """Every entry of [experiment] noise_levels, distinct after parsing; ValueError otherwise."""
    if not isinstance(entries, list):
        raise ValueError(f"expected a list of rates or 'KIND:RATE' strings, got {entries!r}")
    levels = tuple(parse_level(e) for e in entries)
    names = [lv.variant for lv in levels]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"the levels must be distinct, but {', '.join(twice)} appears more than once in {entries!r}")
    return levels


def describe(variant: str) -> str:
    """A variant name as a heading: 'noise0.2' -> 'symmetric noise 20%', 'pair0.2' -> 'pair noise 20%',
    'noise0' -> 'no label noise', 'vit-noise0.2' -> 'vit, symmetric noise 20%'; other names are
    returned as they are."""
    head, _, variant = variant.rpartition("-")
    if head:
        return f"{head}, {describe(variant)}"
    for kind, prefix in _PREFIX.items():
        if variant.startswith(prefix):
            try:
                rate = float(variant[len(prefix):])
            except ValueError:
                break
            return f"{kind} noise {rate:.0%}" if rate else "no label noise"
    return variant


# ---------------------------------------------------------------- noise models

def _symmetric(y: np.ndarray, rng: np.random.Generator, num_classes: int) -> np.ndarray:
    offset = rng.integers(1, num_classes, size=len(y))        # 1..C-1: never the same class
    return (y + offset) % num_classes


def _pair(y: np.ndarray, rng: np.random.Generator, num_classes: int) -> np.ndarray:
    return (y + 1) % num_classes


NEW_LABEL = {"symmetric": _symmetric, "pair": _pair}   # kind -> (clean labels, rng, C) -> noisy labels


def flip_labels(y: np.ndarray, rate: float, rng: np.random.Generator, kind: str = "symmetric",
                num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Flip exactly round(rate * N) labels of `y` (N,) with the noise model `kind`.

    Returns the noisy labels (N,) and the sorted positions that were flipped (K,). The
    positions are drawn first (the same for every kind), then the new labels.
    """
    problem = check_rate(kind, rate)
    if problem:
        raise ValueError(f"label noise: expected {problem}")
    flipped = np.sort(rng.choice(len(y), size=round(rate * len(y)), replace=False))
    noisy = y.copy()
    noisy[flipped] = NEW_LABEL[kind](y[flipped], rng, num_classes)
    return noisy, flipped


# ---------------------------------------------------------------- memorisation

def memorisation(pred: np.ndarray, splits, train_set) -> dict:
    """How the final model classifies the training samples it trained on, flipped or not.

    pred: (N,) the model's predicted classes of `train_set`, in its order. flipped_acc_noisy:
    accuracy on the flipped samples w.r.t. their NOISY labels (how much noise was memorised);
    flipped_acc_clean: w.r.t. their CLEAN labels (how much was recovered); clean_train_acc:
    accuracy on the samples that were not flipped. Empty when the training set holds no
    flipped sample.
    """
    if splits.flipped_clean is None or not len(splits.flipped_ids):
        return {}
    ids = train_set.ids.cpu().numpy()
    flipped_ids = splits.flipped_ids.cpu().numpy()
    is_flipped = np.isin(ids, flipped_ids)
    if not is_flipped.any():
        return {}
    y = train_set.y.cpu().numpy()
    clean_of = dict(zip(flipped_ids.tolist(), splits.flipped_clean.cpu().numpy().tolist()))
    clean = np.array([clean_of[i] for i in ids[is_flipped]])
    out = {"flipped_acc_noisy": float(np.mean(pred[is_flipped] == y[is_flipped])),
           "flipped_acc_clean": float(np.mean(pred[is_flipped] == clean))}
    if (~is_flipped).any():
        out["clean_train_acc"] = float(np.mean(pred[~is_flipped] == y[~is_flipped]))
    return out


# ---------------------------------------------------------------- the [noise] table

@dataclass(frozen=True)
class NoiseConfig:
    """[noise]: how the report analyses label noise (everything optional).

    signals_arm: the arm whose final runs record per-sample signals (its method must record
        them, e.g. "signals"); default: the first such arm, if any.
    reference_signal: the detection signal the others are compared with (paired over seeds).
    drop_fractions: clean-and-retrain: for each signal, drop this fraction of the training set
        that it ranks most suspect and retrain the signals arm; () for no retraining.
    drop_signals: the signals used for dropping (default: every signal, plus "random" when
        listed explicitly); oracle: also retrain without exactly the flipped samples.
    """

    signals_arm: str | None = None
    reference_signal: str = "loss"
    drop_fractions: tuple = ()
    drop_signals: tuple = ()
    oracle: bool = True


KEYS = ("signals_arm", "reference_signal", "drop_fractions", "drop_signals", "oracle")


def parse_tables(source: str, tables: dict, recording_arms: list[str]) -> tuple[tuple, NoiseConfig]:
    """The noise settings of a raw config's tables (keys already checked): [data] label_noise
    and noise_kind, [experiment] noise_levels and [noise]. recording_arms: the arms whose method
    records per-sample signals, in arm order. Returns (canonical noise_levels, NoiseConfig);
    ConfigError names the table and key of a bad value."""
    data = tables["data"]
    if problem := check_rate(data.get("noise_kind", "symmetric"), data.get("label_noise", 0.0)):
        raise ConfigError(f"{source} [data] label_noise: expected {problem}")
    try:
        levels = tuple(lv.spec for lv in parse_levels(tables["experiment"].get("noise_levels", [])))
    except ValueError as e:
        raise ConfigError(f"{source} [experiment] noise_levels: {e}") from None
    try:
        return levels, parse_table(tables["noise"], recording_arms)
    except ValueError as e:
        raise ConfigError(f"{source} [noise] {e}") from None


def parse_table(table: dict, recording_arms: list[str], signal_names: tuple[str, ...] = SIGNAL_NAMES) -> NoiseConfig:
    """Validate a [noise] table (keys already checked). recording_arms: arms whose method records
    per-sample signals, in arm order; signal_names: the detection signals. ValueError with
    'key: message' on a bad value."""
    arm = table.get("signals_arm", recording_arms[0] if recording_arms else None)
    if arm is not None and arm not in recording_arms:
        known = ", ".join(recording_arms) or "none here: give an arm method = 'signals'"
        raise ValueError(f"signals_arm: must name an arm whose method records per-sample signals ({known}), "
                         f"got {arm!r}")
    ref = table.get("reference_signal", "loss")
    if ref not in signal_names:
        raise ValueError(f"reference_signal: expected one of {', '.join(signal_names)}, got {ref!r}")
    fractions = table.get("drop_fractions", [])
    fraction = lambda f: not isinstance(f, bool) and isinstance(f, (int, float)) and 0 < f < 1  # noqa: E731
    if not isinstance(fractions, list) or not all(map(fraction, fractions)) or len(set(fractions)) < len(fractions):
        raise ValueError(f"drop_fractions: expected a list of distinct fractions in (0, 1), got {fractions!r}")
    choices = signal_names + ("random",)
    drop = table.get("drop_signals", list(signal_names))
    if not isinstance(drop, list) or any(s not in choices for s in drop) or len(set(drop)) < len(drop):
        raise ValueError(f"drop_signals: expected a list of distinct names from {', '.join(choices)}, got {drop!r}")
    oracle = table.get("oracle", True)
    if not isinstance(oracle, bool):
        raise ValueError(f"oracle: expected true or false, got {oracle!r}")
    if fractions and arm is None:
        raise ValueError("drop_fractions: clean-and-retrain needs an arm that records per-sample signals "
                         "(an arm with method = \"signals\")")
    return NoiseConfig(arm, ref, tuple(float(f) for f in fractions), tuple(drop), oracle)


def label_records(sample_ids: np.ndarray, splits) -> dict[str, np.ndarray]:
    """{"flipped" (N,) bool, "clean_label" (N,) int64} of training samples given by id (N,)."""
    ids = np.asarray(sample_ids, np.int64)
    full = splits.train_full
    label = np.empty(int(full.ids.max()) + 1, np.int64)
    label[full.ids.cpu().numpy()] = full.y.cpu().numpy()
    flipped_ids = splits.flipped_ids.cpu().numpy()
    if len(flipped_ids) and splits.flipped_clean is not None:
        label[flipped_ids] = splits.flipped_clean.cpu().numpy()
    return {"flipped": np.isin(ids, flipped_ids), "clean_label": label[ids]}

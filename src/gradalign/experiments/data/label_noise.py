"""Label noise as part of the data: the noise models and how an experiment names its noise levels
(the [noise] analysis table is config/noise_table.py; what a model memorised, label_noise/).

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
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


NOISE_KINDS = ("symmetric", "pair")
VARIANT_PREFIX = {"symmetric": "noise", "pair": "pair"}  # kind -> variant name prefix (+ rate)


class NoiseLevel(NamedTuple):
    """One noise setting: its kind and rate."""

    kind: str
    rate: float

    @property
    def variant(self) -> str:
        """The sub-experiment's name: noise0.2 (symmetric) or pair0.2."""
        return f"{VARIANT_PREFIX[self.kind]}{self.rate:g}"

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
    for kind, prefix in VARIANT_PREFIX.items():
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

"""Clean-and-retrain's drop rules: which training samples a rule removes, from a run's records.

    <signal>-<fraction>   the round(fraction * N) samples the detection signal ranks most suspect
                          (detection.py), by its value over training; ties in a random order
                          drawn from the seed
    random-<fraction>     a random fraction (a control: what dropping data alone does)
    oracle                exactly the flipped samples

Rules come from [noise] drop_signals x drop_fractions, plus the oracle ([noise] oracle).
"""
from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np

from gradalign.experiments.label_noise.detection import most_suspect, scores


class DropRule(NamedTuple):
    name: str                 # "loss-0.1", "random-0.2", "oracle"
    signal: str | None        # a detection signal, "random", or None (oracle)
    fraction: float | None    # None for the oracle


def drop_rules(noise_cfg) -> list[DropRule]:
    """The rules of a [noise] table (a config.NoiseConfig, or its dict from config.json)."""
    get = noise_cfg.get if isinstance(noise_cfg, dict) else lambda k: getattr(noise_cfg, k)
    fractions = get("drop_fractions") or ()
    if not fractions:
        return []
    out = [DropRule(f"{s}-{f:g}", s, f) for s in get("drop_signals") for f in fractions]
    return out + ([DropRule("oracle", None, None)] if get("oracle") else [])


def dropped(rule: DropRule, records: dict, seed: int) -> np.ndarray:
    """Sorted ids of the training samples the rule drops, from the seed's records."""
    ids = np.asarray(records["sample_id"])
    if rule.signal is None:
        return np.sort(ids[np.asarray(records["flipped"], bool)])
    if rule.signal == "random":
        score = np.zeros(len(ids))
    else:
        score = scores(rule.signal, records)[1]
    return np.sort(ids[most_suspect(score, rule.fraction, seed)])


def digest(ids: np.ndarray) -> str:
    """A short hash of sample ids: what a retrained run records of the samples it was trained without."""
    return hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest()[:16]

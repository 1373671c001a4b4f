"""The [noise] table: how the report analyses label noise (NoiseConfig), and the noise settings
of a raw config ([data] label_noise and noise_kind, [experiment] noise_levels, [noise])."""
from __future__ import annotations

from dataclasses import dataclass

from gradalign.errors import ConfigError
from gradalign.experiments.data.label_noise import check_rate, parse_levels
from gradalign.experiments.label_noise.detection import SIGNAL_NAMES


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

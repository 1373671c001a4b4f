"""Value checks for configurations and arm parameters.

A check takes a value and returns None when it is fine, else a phrase saying what was
expected ("a number > 0"), which the caller puts into its error message.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from gradalign.errors import ConfigError

Check = Callable[[Any], "str | None"]


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def positive(v):
    return None if is_number(v) and v > 0 else "a number > 0"


def nonneg(v):
    return None if is_number(v) and v >= 0 else "a number >= 0"


def pos_int(v):
    return None if is_int(v) and v >= 1 else "an integer >= 1"


def nonneg_int(v):
    return None if is_int(v) and v >= 0 else "an integer >= 0"


def unit_open(v):
    return None if is_number(v) and 0 < v < 1 else "a number in (0, 1)"


def unit_closed(v):
    return None if is_number(v) and 0 <= v <= 1 else "a number in [0, 1]"


def unit_right_open(v):
    return None if is_number(v) and 0 <= v < 1 else "a number in [0, 1)"


def boolean(v):
    return None if isinstance(v, bool) else "true or false"


def number(v):
    return None if is_number(v) else "a finite number"


def one_of(*options) -> Check:
    return lambda v: None if v in options else "one of " + ", ".join(map(repr, options))


def word(v):
    """A name usable in folder and study names."""
    ok = isinstance(v, str) and v and v.replace("_", "").replace("-", "").isalnum()
    return None if ok else "a non-empty word of letters, digits, _ or -"


# ---------------------------------------------------------------- tables

def config_error(where: str, msg: str) -> ConfigError:
    """The ConfigError "<where>: <msg>"."""
    return ConfigError(f"{where}: {msg}")


def check_keys(where: str, table, valid) -> None:
    """Refuse a non-table or unknown keys, listing the valid ones."""
    if not isinstance(table, dict):
        raise config_error(where, f"expected a table, got {table!r}")
    unknown = sorted(set(table) - set(valid))
    if unknown:
        raise config_error(where, f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                          f"valid keys: {', '.join(valid)}")


def check_values(prefix: str, table: dict, spec: dict) -> None:
    """Check every value of `table` against spec {key: check}; errors name `prefix` + key."""
    for key, value in table.items():
        problem = spec[key](value) if spec[key] else None
        if problem:
            raise config_error(f"{prefix}{key}", f"expected {problem}, got {value!r}")

"""Where a raw experiment configuration comes from: a bundled name or a TOML path, and the
`--set KEY=VALUE` override language. Produces plain dicts; config.py validates them."""
from __future__ import annotations

import copy
import sys
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from gradalign.errors import ConfigError


def bundled_names() -> list[str]:
    """Names of the experiments shipped in gradalign/configs."""
    root = resources.files("gradalign") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def read_toml(name_or_path: str | Path) -> tuple[dict, str]:
    """The raw dict of a bundled experiment name or a TOML path, and a label for messages."""
    path = Path(name_or_path)
    bundled = str(name_or_path) in bundled_names()
    if path.suffix == ".toml" or path.is_file() or (path.exists() and not bundled):
        if path.is_dir():
            raise ConfigError(f"config {str(path)!r} is a folder: give the path of a .toml file")
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        label = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{label}: not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"{label}: cannot be read ({e.strerror})") from None
    else:  # a bundled name wins over a folder of the same name (e.g. a run folder called "gasw")
        if not bundled:
            raise ConfigError(f"unknown experiment {str(name_or_path)!r}: give a bundled name "
                              f"({', '.join(bundled_names())}) or a path to a .toml file")
        text = (resources.files("gradalign") / "configs" / f"{name_or_path}.toml").read_text(encoding="utf-8")
        label = f"{name_or_path}.toml"
    try:
        return tomllib.loads(text), label
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{label}: not valid TOML: {e}") from None


def merge(base: dict, over: dict) -> dict:
    """Deep merge of plain dicts: tables merge key by key, other values replace."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """'train.epochs=3' -> ("train.epochs", 3); values are TOML, bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. train.epochs=3), got {text!r}")
    key, value = (s.strip() for s in text.split("=", 1))
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key, parsed


def apply_overrides(raw: dict, overrides: dict[str, Any], *, tables: tuple[str, ...],
                    top_keys: tuple[str, ...]) -> dict:
    """Set dotted keys, e.g. {"train.epochs": 2, "arms.gasw.params.gamma": 1.0}.

    tables: the top-level tables (a key inside one is required); top_keys: every valid
    top-level key. Arms are addressed by name: arms.<arm name>.<key>.
    """
    raw = copy.deepcopy(raw)
    for path, value in overrides.items():
        parts = path.split(".")
        node = raw
        if parts[0] == "arms":
            if len(parts) < 3:
                raise ConfigError(f"override {path!r}: use arms.<arm name>.<key>")
            arms = {a.get("name"): a for a in raw.get("arms", [])}
            if parts[1] not in arms:
                raise ConfigError(f"override {path!r}: no arm {parts[1]!r}; arms: {', '.join(map(str, arms))}")
            node, parts = arms[parts[1]], parts[2:]
        elif parts[0] not in top_keys or len(parts) == 1 and parts[0] in tables:
            names = [k for k in top_keys if k not in ("quick", "arms")]
            raise ConfigError(f"override {path!r}: the first part must be one of {', '.join(names)} or arms.<name>")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {path!r}: {p!r} is not a table")
        node[parts[-1]] = value
    return raw

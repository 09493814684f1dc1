"""Plain data → frozen dataclasses: keys, types and ranges checked, YAML and overrides read.

Every config dataclass of the schema is built by `from_dict`: unknown keys are
rejected with the nearest valid name, values are coerced to the field's type
(``12`` → ``12.0`` for a float, YAML 1.1's ``1e-4`` string → a number), and a
nested dataclass's ``check(path)`` runs with the dotted path of its section, so
every message names the field. The value checks (`check_range`, `one_of`,
`at_least`) are shared with the pure functions of ``postproc``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from training.errors import ConfigError, did_you_mean

_YAML11_EXPONENT = re.compile(r"[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+")


# ---------------------------------------------------------------- building


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, rejecting unknown keys and bad types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"{where}: unknown key{did_you_mean(key, names)}; valid keys: {', '.join(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # a bug in a dataclass, not user input
        raise ConfigError(f"{path or 'config'}: {err}") from None


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            value = [value]  # a single scale is a one-element list
        inner = typing.get_args(hint)[0]
        return tuple(_coerce(inner, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(members) == 1 and dataclasses.is_dataclass(members[0]):  # an optional section (scd)
            return None if value is None else from_dict(members[0], value, path)
        return value
    return _scalar(hint, value, path)


def _scalar(hint: Any, value: Any, path: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
            return float(value)  # PyYAML reads `1e-4` (no dot) as a string
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, bool):  # YAML turns `pretrained: false` into a bool
            return "true" if value else "false"
        if isinstance(value, str | int | float):
            return str(value)
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def check_tree(node: Any, path: str = "") -> None:
    """Run ``check(path)`` of every nested dataclass of ``node``, innermost first."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            sub = f"{path}.{f.name}" if path else f.name
            check_tree(value, sub)
            check = getattr(value, "check", None)
            if check is not None:
                check(sub)


def shallow_fields(node: Any) -> dict[str, Any]:
    """A dataclass's fields as keyword arguments; unlike ``asdict``, values are not copied
    (a ready SAM model stays the same object)."""
    return {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}


def plain(value: Any) -> Any:
    """Tuples → lists so the dict round-trips through YAML and JSON."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def config_digest(data: dict[str, Any]) -> str:
    """A short stable hash of plain config data (cache keys for data and teachers)."""
    return hashlib.sha256(json.dumps(plain(data), sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- value checks


def one_of(value: Any, valid: tuple, path: str) -> None:
    """Raise ConfigError unless ``value`` is one of ``valid``."""
    if value not in valid:
        raise ConfigError(
            f"{path}: expected one of {', '.join(map(str, valid))}, got {value!r}"
            f"{did_you_mean(str(value), map(str, valid))}"
        )


def at_least(value: int, low: int, path: str) -> None:
    """Raise ConfigError unless ``value ≥ low``."""
    if value < low:
        raise ConfigError(f"{path}: expected ≥ {low}, got {value}")


def check_range(
    name: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ConfigError unless ``value`` is a number with ``low (<|<=) value (<|<=) high``.

    Numpy scalars count as numbers; booleans do not.
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'(' if low_open else '['}{low:g}"
        hi = "" if high is None else f"{high:g}{')' if high_open else ']'}"
        expected = f"a number in {lo or '(-inf'}, {hi or 'inf)'}"
        raise ConfigError(f"{name}: expected {expected}, got {value!r}")


def check_int(name: str, value: Any, *, low: int, what: str = "") -> None:
    """Raise ConfigError unless ``value`` is an integer ≥ ``low`` (``what`` explains it)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ConfigError(f"{name}: expected an integer ≥ {low}{f' ({what})' if what else ''}, got {value!r}")


# ---------------------------------------------------------------- YAML + overrides


def load_yaml(path: Path) -> Any:
    """Parse a YAML file with the safe loader; syntax errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file ({err.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {err.problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML error: {err}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["transfer.lam=0.5", "cam.scales=[1.0]"]`` into a dotted-key mapping."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. transfer.lam=0.5")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: cannot parse the value {raw!r}") from None
    return out


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted-key overrides set."""
    data = json.loads(json.dumps(data or {}))
    for key, value in overrides.items():
        set_dotted(data, key, value)
    return data


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "a.b", 1)`` sets ``d["a"]["b"] = 1``, creating ``d["a"]`` if needed."""
    parts = key.split(".")
    node = d
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def dig(d: dict[str, Any], key: str) -> Any:
    """``dig(d, "a.b")`` is ``d["a"]["b"]``."""
    for part in key.split("."):
        d = d[part]
    return d

"""Config files and ``--set`` overrides as plain dicts: YAML read with ``extends:`` resolved,
``key=value`` parsed as YAML scalars, dotted keys set. :mod:`prn_ray.config` types and
checks what comes out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from prn_ray.errors import ConfigError

EXTENDS_KEY = "extends"  # top-level key: a YAML file (relative to this one) read first


def read_yaml(path: str | Path, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config file as a dict, with ``extends: base.yaml`` resolved (the file's own values
    win, section by section and key by key)."""
    path = Path(path)
    real = str(path.resolve())
    if real in _seen:
        raise ConfigError(f"{path}: 'extends' loops back to {path.name}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path}{yaml_place(exc)}: not valid YAML: "
                          f"{yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    base = data.pop(EXTENDS_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: '{EXTENDS_KEY}' must be the path of a YAML file")
    merged = read_yaml(path.parent / base, (*_seen, real))
    for section, values in data.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def yaml_place(exc: yaml.YAMLError) -> str:
    """``", line 3, column 9"`` (1-based) where the YAML parser stopped, if it says."""
    mark = getattr(exc, "problem_mark", None)
    return f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def yaml_problem(exc: yaml.YAMLError) -> str:
    return getattr(exc, "problem", None) or str(exc).splitlines()[0]


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=1e-3"`` -> ``("train.lr", 0.001)``; values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    if not raw.strip():
        return key, None
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: {raw!r} is not a valid value ({yaml_problem(exc)})"
                          ) from None


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        parent, node = node, node.setdefault(part, {})
        if isinstance(node, (str, bool)) and len(parts) > 2:
            node = parent[part] = {"mode": node}  # a subsection's shorthand (tiles: auto)
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is not a section")
    node[parts[-1]] = value

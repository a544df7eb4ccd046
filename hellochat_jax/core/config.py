"""Typed configs: dataclasses filled from YAML files in configs/ plus ``key=value`` overrides.

Unknown keys and ill-typed values are errors reported before any compute starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from hellochat_jax.core.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    pass


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is None:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} fits none of {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Builds a (nested) dataclass, refusing keys it does not have."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except UserError:
        raise
    except ValueError as e:  # the dataclass's own checks (__post_init__): say which section
        raise ConfigError(f"{where}: {e}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-3", "mesh.data=2"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# Where a bare config name ("tiny") is looked up: the configs/ installed as package data
# (hellochat_jax/configs), then a source checkout's top-level configs/ (editable installs).
SHIPPED_CONFIG_DIRS = (Path(__file__).resolve().parents[1] / "configs", Path(__file__).resolve().parents[2] / "configs")


def resolve_path(path: str | Path) -> Path:
    """A config file: the path itself if it exists, else a shipped config by bare name
    (``tiny`` or ``tiny.yaml`` -> configs/tiny.yaml), from any working folder."""
    path = Path(path)
    if path.exists() or path.parent != Path("."):
        return path
    name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    for folder in SHIPPED_CONFIG_DIRS:
        if (folder / name).is_file():
            return folder / name
    return path


def shipped_config_names() -> list[str]:
    return sorted({p.stem for folder in SHIPPED_CONFIG_DIRS if folder.is_dir() for p in folder.glob("*.yaml")})


def load_dict(path: str | Path | None) -> dict[str, Any]:
    """A config file's mapping (yaml tags read as data: safe_load); {} for no file."""
    if path is None:
        return {}
    path = resolve_path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found (shipped configs, usable by name: {', '.join(shipped_config_names()) or 'none'})")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    data = merge(load_dict(path), parse_overrides(overrides or []))
    return from_dict(cls, data, where=str(path or "config"))

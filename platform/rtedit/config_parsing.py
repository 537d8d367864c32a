"""Plain data (YAML, JSON, CLI) -> nested typed dataclasses, driven by their type hints; the one parser of every
config in the project (engine, Serve app, jobs). Unknown keys, wrong types, NaN and infinities raise ConfigError
naming the field. Hand-written: dataclasses has no from_dict, and pydantic is not a dependency of rtedit.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

from rtedit.errors import ConfigError

T = TypeVar("T")




def _fail(path: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{path} must be {expected}, got {value!r}")


def _convert(tp: Any, value: Any, path: str, start: Any = None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        _reject_non_finite(value, path)
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(non_none[0], value, path, start)
        raise ConfigError(f"{path}: unions other than Optional are not supported")
    if origin is typing.Literal:
        if value not in args:
            raise _fail(path, value, f"one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _fail(path, value, "a mapping")
        return from_dict(tp, value, path, start if dataclasses.is_dataclass(start) else None)
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(path, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(path, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(path, value, "a number")
        if not math.isfinite(value):
            raise _fail(path, value, "a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _fail(path, value, "a string")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _fail(path, value, "a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _fail(path, value, f"a list of {len(args)} items")
            return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(path, value, "a mapping")
        item = args[1] if args else Any
        return {str(k): _convert(item, v, f"{path}.{k}") for k, v in value.items()}
    raise ConfigError(f"{path}: unsupported field type {tp!r}")


def _reject_non_finite(value: Any, path: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(path, value, "a finite number")
    if isinstance(value, dict):
        for k, v in value.items():
            _reject_non_finite(v, f"{path}.{k}")
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _reject_non_finite(v, f"{path}[{i}]")


def from_dict(cls: type[T], data: dict[str, Any], path: str = "", base: T | None = None) -> T:
    """Build dataclass `cls` from a mapping: nested sections, strict types, unknown keys rejected.

    Fields the mapping leaves out keep `base`'s values when given, else the field defaults. A nested section
    starts from its field's default_factory instance (which may differ from the class defaults).
    """
    if not isinstance(data, dict):
        raise _fail(path or cls.__name__, data, "a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        named = ", ".join(f"{path}.{u}" if path else u for u in unknown)
        raise ConfigError(f"unknown field(s) {named} in {path or cls.__name__}; known: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        where = f"{path}.{name}" if path else name
        if name in data:
            start = getattr(base, name) if base is not None else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            kwargs[name] = _convert(hints[name], data[name], where, start)
        elif base is None and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where} is required")
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain YAML-able data (tuples become lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(config))


def parse_override(item: str, flag: str) -> tuple[str, Any]:
    """One `section.key=value` command-line override as (dotted key, value parsed as YAML), or a ConfigError that
    names `flag`."""
    import yaml  # imported on use: the engine's config path needs no YAML

    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{flag} must look like section.key=value, got {item!r}")
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or exc  # the one-line cause, without YAML's multi-line marks
        raise ConfigError(f"{flag} {key}: cannot parse {raw!r} as a YAML value: {problem}") from exc


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Apply one `a.b.c=value` override to nested mappings (values parsed as YAML scalars)."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
    node[keys[-1]] = value

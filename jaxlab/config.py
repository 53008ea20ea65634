"""Typed, frozen configs built from untrusted dicts with one-line errors.

`from_dict(cls, d)` rejects unknown fields and wrong types by name, so a typo in
a config file fails loudly instead of silently using a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping


class ConfigError(ValueError):
  """A bad configuration value; the message names the field."""


def _check_type(cls_name: str, name: str, tp: Any, value: Any) -> Any:
  origin = typing.get_origin(tp)
  if tp is Any:
    return value
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    errors = []
    for a in args:
      if a is type(None):
        continue
      try:
        return _check_type(cls_name, name, a, value)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(f"{cls_name}.{name}: expected {tp}, got {value!r}")
  if dataclasses.is_dataclass(tp) and isinstance(tp, type):
    if isinstance(value, tp):
      return value
    if isinstance(value, Mapping):
      return from_dict(tp, value, prefix=f"{cls_name}.{name}")
    raise ConfigError(f"{cls_name}.{name}: expected a mapping, got {value!r}")
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{cls_name}.{name}: expected a list, got {value!r}")
    args = typing.get_args(tp)
    inner = args[0] if args else Any
    return tuple(_check_type(cls_name, name, inner, v) for v in value)
  if origin in (dict, Mapping, typing.Mapping) or tp in (dict, Mapping):
    if not isinstance(value, Mapping):
      raise ConfigError(f"{cls_name}.{name}: expected a mapping, got {value!r}")
    return dict(value)
  if tp is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{cls_name}.{name}: expected a number, got {value!r}")
    return float(value)
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{cls_name}.{name}: expected an integer, got {value!r}")
    return value
  if tp is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{cls_name}.{name}: expected true/false, got {value!r}")
    return value
  if tp is str:
    if not isinstance(value, str):
      raise ConfigError(f"{cls_name}.{name}: expected a string, got {value!r}")
    return value
  return value


def from_dict(cls, d: Mapping[str, Any], *, prefix: str | None = None):
  """Build dataclass `cls` from a mapping, naming any bad or unknown field."""
  label = prefix or cls.__name__
  if not isinstance(d, Mapping):
    raise ConfigError(f"{label}: expected a mapping, got {type(d).__name__}")
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  unknown = [k for k in d if k not in fields]
  if unknown:
    raise ConfigError(f"{label}: unknown field {unknown[0]!r} (known: {', '.join(sorted(fields))})")
  kwargs = {k: _check_type(label, k, hints[k], v) for k, v in d.items()}
  try:
    return cls(**kwargs)
  except TypeError as e:
    raise ConfigError(f"{label}: {e}") from None


def to_dict(cfg) -> dict:
  """JSON-friendly dict of a (nested) config dataclass."""
  out = {}
  for f in dataclasses.fields(cfg):
    v = getattr(cfg, f.name)
    if dataclasses.is_dataclass(v):
      v = to_dict(v)
    elif isinstance(v, tuple):
      v = list(v)
    elif isinstance(v, Mapping):
      v = dict(v)
    out[f.name] = v
  return out


def require(cond: bool, cls_name: str, field: str, msg: str):
  if not cond:
    raise ConfigError(f"{cls_name}.{field}: {msg}")

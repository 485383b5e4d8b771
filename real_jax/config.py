"""Typed experiment configuration: the ConfigDict from a config file becomes frozen dataclasses once.

Config files (`configs/*.py`) are Python executed by `ml_collections.config_flags`, like in every
ml-collections project: they are trusted code. Library code never reads a ConfigDict; it receives the
dataclasses below, built by `experiment_from_config`, which rejects unknown keys, wrong types and
inconsistent combinations with a `ConfigError` that names the key (e.g. `config.data.batch_size`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
  """A config that cannot run; the message names the key at fault."""


def _type_ok(value, tp) -> bool:
  origin = typing.get_origin(tp)
  if tp is Any:
    return True
  if origin in (typing.Union, types.UnionType):
    return any(_type_ok(value, a) for a in typing.get_args(tp))
  if tp is type(None):
    return value is None
  if tp is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if tp is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if origin is tuple:
    return isinstance(value, (tuple, list))
  if origin in (dict, Mapping):
    return isinstance(value, Mapping)
  if isinstance(tp, type):
    return isinstance(value, tp)
  return True


def from_dict(cls, data: Mapping[str, Any], where: str = "config"):
  """Builds dataclass `cls` from a mapping, recursing into dataclass-typed fields.

  Raises ConfigError naming `where.key` for unknown keys, missing required keys and wrong types.
  """
  if hasattr(data, "to_dict"):
    data = data.to_dict()
  if not isinstance(data, Mapping):
    raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - set(fields))
  if unknown:
    raise ConfigError(f"{where}.{unknown[0]}: unknown key (known keys: {sorted(fields)})")
  kwargs = {}
  for name, f in fields.items():
    key = f"{where}.{name}"
    if name not in data:
      if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        raise ConfigError(f"{key}: required key is missing")
      continue
    value, tp = data[name], hints[name]
    if dataclasses.is_dataclass(tp):
      value = from_dict(tp, value, key)
    elif typing.get_origin(tp) in (dict, Mapping) and dataclasses.is_dataclass(typing.get_args(tp)[1]):
      inner = typing.get_args(tp)[1]
      if hasattr(value, "to_dict"):
        value = value.to_dict()
      if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be a mapping of name -> {inner.__name__}")
      value = {k: from_dict(inner, v, f"{key}.{k}") for k, v in value.items()}
    elif not _type_ok(value, tp):
      raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {type(value).__name__} {value!r}")
    if typing.get_origin(tp) is tuple and isinstance(value, list):
      value = tuple(value)
    if tp is float and isinstance(value, int):
      value = float(value)
    kwargs[name] = value
  try:
    return cls(**kwargs)
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:
    raise ConfigError(f"{where}: {e}") from None

"""Algorithm name -> program class (`config.algorithm` picks one)."""

from __future__ import annotations

from collections.abc import Callable

_PROGRAMS: dict[str, type] = {}


def register_program(name: str) -> Callable[[type], type]:
  """Class decorator: registers a `Program` subclass as `config.algorithm = name`."""

  def deco(cls):
    if name in _PROGRAMS and _PROGRAMS[name] is not cls:
      raise ValueError(f"program {name!r} is already registered (by {_PROGRAMS[name].__qualname__})")
    cls.name = name
    _PROGRAMS[name] = cls
    return cls

  return deco


def get_program(name: str) -> type:
  if name not in _PROGRAMS:
    raise ValueError(f"config.algorithm={name!r}: no program registered; known: {sorted(_PROGRAMS)}")
  return _PROGRAMS[name]


def list_programs() -> list[str]:
  return sorted(_PROGRAMS)

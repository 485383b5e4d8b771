"""Building blocks shared by the config scripts in `configs/` (the role of big_vision's configs/common.py).

`ml_collections.config_flags` executes a config file by its path, so a config cannot import a sibling
module; the shared pieces live here, in the library:

    from real_jax import config_lib as cl

    def get_config(arg=None):
      args = cl.parse_arg(arg, plan=("colocated", "split"))
      c = ml_collections.ConfigDict()
      c.models = ml_collections.ConfigDict()
      c.models.actor = cl.model("tiny", cl.TINY, head="lm")
      c.optim = ml_collections.ConfigDict()
      c.optim.actor = cl.constant_optim(1e-3)
      ...

Every helper returns plain dicts / modules: the config file stays the one place that says what a run is.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

# The tiny LLaMA-shaped model of the `*_tiny` configs and the tests: 2 layers, d_model 64, GQA 4 / 2 heads.
TINY = dict(vocab_size=64, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, max_seq_len=64)


def parse_arg(arg: str | None, **choices: Sequence[str] | Callable[[str], Any]) -> dict[str, Any]:
  """The config argument `key=value,...` (after `config.py:`) as a dict.

  `choices` names every accepted key with either its allowed values (a sequence of strings, the first
  being the default) or a type such as `int` that converts a free value (default None). An unknown key,
  a value not allowed or not convertible, or an item without `=` raises ValueError naming it, so a typo
  such as `plna=split` is not silently ignored.
  """
  out = {k: None if callable(v) else v[0] for k, v in choices.items()}
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key:
      raise ValueError(f"config argument {item!r}: expected key=value (keys: {', '.join(choices) or 'none'})")
    if key not in choices:
      raise ValueError(f"config argument {key}={value}: unknown key; known: {', '.join(choices) or 'none'}")
    allowed = choices[key]
    if callable(allowed):
      try:
        out[key] = allowed(value)
      except ValueError as e:
        raise ValueError(f"config argument {key}={value}: not a valid {getattr(allowed, '__name__', allowed)}") from e
      continue
    if value not in allowed:
      raise ValueError(f"config argument {key}={value}: expected one of {', '.join(allowed)}")
    out[key] = value
  return out


def model(preset: str, overrides: dict | None = None, *, head: str, init: str = "random", rule: str = "",
          seed: int = 0) -> dict:
  """One `config.models.<role>` entry (see `real_jax.experiment.ModelSpec`)."""
  return dict(preset=preset, overrides=dict(overrides or {}), head=head, init=init, rule=rule, seed=seed)


def constant_optim(lr: float, *, clip_norm: float = 1.0) -> dict:
  """AdamW at a constant learning rate (the tiny configs)."""
  return dict(lr=lr, warmup_steps=0, decay="constant", decay_steps=1, clip_norm=clip_norm)


def cosine_optim(lr: float, *, warmup_steps: int, decay_steps: int, clip_norm: float = 1.0) -> dict:
  """AdamW with linear warm-up then cosine decay."""
  return dict(lr=lr, warmup_steps=warmup_steps, decay="cosine", decay_steps=decay_steps, clip_norm=clip_norm)


def load_sibling(config_file: str, name: str) -> ModuleType:
  """The config module `name` beside `config_file` (pass `__file__`), e.g. the shared body of a family."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name + ".py")
  if not os.path.exists(path):
    raise FileNotFoundError(f"load_sibling: no config {path}")
  spec = importlib.util.spec_from_file_location(f"_real_jax_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module

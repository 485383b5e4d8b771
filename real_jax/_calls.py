"""Shared plumbing of the jitted calls (generation, inference, train step).

* `cached(key, build)`: one jitted function per (call kind, layout, static config, input
  shapes/dtypes), so repeated calls neither retrace nor rebuild their shardings.
* `sharding_hook(layout)`: the `activation_constraints` function that turns the logical activation
  axes model code names into `with_sharding_constraint`s under a Layout.
* `compute_params(state, dtype)`: the one cast from stored (e.g. fp32 master) parameters to the
  compute dtype. Generation, inference and the train step all use it, so they run the same
  numbers through the same forward path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sharding import Layout, activation_sharding

_CACHE: dict[Any, Any] = {}
_LOCK = threading.Lock()


def cached(key: Any, build: Callable[[], Any]) -> Any:
  """The value cached under `key`, built once by `build()`."""
  with _LOCK:
    fn = _CACHE.get(key)
    if fn is None:
      fn = _CACHE[key] = build()
    return fn


def cache_size() -> int:
  return len(_CACHE)


def shape_key(tree: Any) -> Any:
  """Hashable (structure, shapes, dtypes) of a pytree of arrays."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


def sharding_hook(layout: Layout) -> Callable[[jax.Array, tuple], jax.Array]:
  def constrain(x, names):
    return jax.lax.with_sharding_constraint(x, activation_sharding(layout, tuple(names), tuple(x.shape)))
  st = layout.strategy
  constrain.shards = {"batch": st.data * st.fsdp, "vocab": st.tensor}  # For `transformer.axis_shards`.
  return constrain


def compute_params(state: Any, dtype: str | jnp.dtype) -> Any:
  """Floating-point leaves cast to the compute dtype (a no-op when they already have it)."""
  dt = jnp.dtype(dtype)

  def cast(x):
    return x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dt else x
  return jax.tree.map(cast, state)


def split_model(model: Any) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, state) of an nnx model, or the pair itself."""
  if isinstance(model, tuple):
    return model
  return nnx.split(model)


def batch_sharding(layout: Layout, shape: tuple[int, ...]) -> jax.sharding.NamedSharding:
  """Sharding of a [B, ...] batch array: B over (data, fsdp), the rest replicated."""
  return activation_sharding(layout, ("batch",) + (None,) * (len(shape) - 1), tuple(shape))

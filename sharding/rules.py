"""Logical-axis rules: from the logical names a model gives its arrays to mesh axes.

Model code names dimensions with logical axes only (`vocab`, `embed`, `heads`, `kv_heads`,
`head_dim`, `mlp`, `layers`; activations add `batch` and `seq`). A *rule set* maps each logical
axis to a mesh axis (or a tuple of them, or None = replicated). `shardings_for` applies the rule
set named by a `Layout` to a whole abstract state and returns a pytree of `NamedSharding`.

Rule sets (parameters / optimizer state):

========== =================== ================================= ===========================
name       embed               heads, kv_heads, mlp, vocab        mesh axes it needs
========== =================== ================================= ===========================
fsdp       fsdp                -                                  tensor == 1
fsdp_tensor fsdp               tensor                             any
data_tensor -                  tensor                             fsdp == 1
replicated -                   -                                  fsdp == tensor == 1
auto       fsdp                tensor                             any (= fsdp_tensor)
========== =================== ================================= ===========================

`data` never shards parameters; activations shard `batch` over (data, fsdp) in every rule set,
and the tensor-parallel activation axes (`heads`, `kv_heads`, `mlp`, `vocab`) over `tensor`.

Divisibility: a dimension that a rule shards must divide by the product of its mesh axes. The one
documented exception is `kv_heads`: with grouped-query attention there may be fewer KV heads than
tensor shards (e.g. 8 KV heads, tensor=16); then the KV projections are replicated over `tensor`
instead (the standard GQA practice), costing memory but no correctness. Every other mismatch raises
a ValueError naming the parameter, the dimension and the sizes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from sharding.mesh import Layout

MeshAxes = str | tuple[str, ...] | None

_TP = {"heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"}

PARAM_RULES: dict[str, dict[str, MeshAxes]] = {
    "fsdp": {"embed": "fsdp"},
    "fsdp_tensor": {"embed": "fsdp", **_TP},
    "data_tensor": dict(_TP),
    "replicated": {},
}
PARAM_RULES["auto"] = PARAM_RULES["fsdp_tensor"]

# Mesh axes a rule set leaves unused for parameters; a strategy may not give them size > 1
# (data is always allowed: it replicates parameters by definition).
_UNUSED = {"fsdp": ("tensor",), "fsdp_tensor": (), "data_tensor": ("fsdp",), "replicated": ("fsdp", "tensor"),
           "auto": ()}

ACTIVATION_RULES: dict[str, MeshAxes] = {"batch": ("data", "fsdp"), **_TP}

# Logical axes that fall back to replication when they do not divide (see module docstring).
_REPLICATE_IF_UNEVEN = frozenset({"kv_heads"})

LOGICAL_AXES = frozenset({"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers", "batch", "seq",
                          "cache_seq", "stats"})


def check_rules(layout: Layout) -> None:
  """Raises if the layout's strategy uses a mesh axis its rule set ignores, or the name is unknown."""
  if layout.rules not in PARAM_RULES:
    raise ValueError(f"unknown rule set {layout.rules!r}; choose one of {sorted(PARAM_RULES)}")
  st = layout.strategy
  bad = [ax for ax in _UNUSED[layout.rules] if getattr(st, ax) > 1]
  if bad:
    raise ValueError(f"rule set {layout.rules!r} does not shard parameters over {bad}, but strategy {st} "
                     f"gives {bad[0]}={getattr(st, bad[0])}; use rule set 'auto' or change the strategy")


def _axis_size(layout: Layout, axes: MeshAxes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  n = 1
  for a in axes:
    n *= getattr(layout.strategy, a)
  return n


def spec_for(logical: tuple[str | None, ...], shape: tuple[int, ...], layout: Layout,
             rules: Mapping[str, MeshAxes], *, what: str = "array") -> PartitionSpec:
  """The PartitionSpec of one array from its logical axes, checking divisibility."""
  if len(logical) != len(shape):
    raise ValueError(f"{what}: logical axes {logical} do not match its shape {shape}")
  spec: list[MeshAxes] = []
  used: set[str] = set()
  for name, dim in zip(logical, shape):
    if name is not None and name not in LOGICAL_AXES:
      raise ValueError(f"{what}: unknown logical axis {name!r}; known: {sorted(LOGICAL_AXES)}")
    axes = rules.get(name) if name is not None else None
    if axes is not None:
      flat = (axes,) if isinstance(axes, str) else tuple(axes)
      # Drop size-1 mesh axes (keeps specs minimal) and axes already used by an earlier dim.
      flat = tuple(a for a in flat if getattr(layout.strategy, a) > 1 and a not in used)
      axes = None if not flat else (flat[0] if len(flat) == 1 else flat)
    n = _axis_size(layout, axes)
    if n > 1 and dim % n:
      if name in _REPLICATE_IF_UNEVEN:
        axes = None
      else:
        raise ValueError(f"{what}: dimension {name!r} of size {dim} does not divide over mesh axes {axes} "
                         f"of size {n} (layout {layout}); pick a strategy whose {axes} size divides {dim}")
    if axes is not None:
      used.update((axes,) if isinstance(axes, str) else axes)
    spec.append(axes)
  while spec and spec[-1] is None:
    spec.pop()
  return PartitionSpec(*spec)


def logical_axes_of(variable: Any) -> tuple[str | None, ...] | None:
  """The `logical_axes` metadata of an nnx.Variable (None if it has none)."""
  meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
  axes = meta.get("logical_axes")
  return tuple(axes) if axes is not None else None


def _is_variable(x) -> bool:
  from flax import nnx
  return isinstance(x, nnx.Variable)


def shardings_for(abstract_state: Any, layout: Layout) -> Any:
  """A pytree of NamedSharding for `abstract_state` under `layout`'s rule set.

  `abstract_state` is a pytree (an `nnx.State`, or any nesting of dicts/lists) whose leaves are
  `nnx.Variable`s carrying `logical_axes` metadata (what `nnx.eval_shape` of a model gives), or
  plain arrays / `jax.ShapeDtypeStruct`s. Leaves without logical axes must be scalars (step
  counters and the like), which are replicated; anything else raises, naming the leaf.
  The result has the same structure, with Variables replaced by their sharding
  (`nnx.State`'s own tree flattening treats Variables as leaves).
  """
  check_rules(layout)
  rules = PARAM_RULES[layout.rules]
  mesh = layout.mesh

  def one(path, leaf):
    where = jax.tree_util.keystr(path)
    if _is_variable(leaf):
      logical = logical_axes_of(leaf)
      shape = tuple(leaf.get_value().shape) if hasattr(leaf, "get_value") else tuple(leaf.value.shape)
    else:
      logical, shape = None, tuple(getattr(leaf, "shape", ()))
    if logical is None:
      if shape:
        raise ValueError(f"state leaf {where} of shape {shape} has no logical_axes metadata; every "
                         f"non-scalar array must name its axes")
      return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, spec_for(logical, shape, layout, rules, what=f"parameter {where}"))

  return jax.tree_util.tree_map_with_path(one, abstract_state, is_leaf=_is_variable)


def activation_sharding(layout: Layout, logical: tuple[str | None, ...],
                        shape: tuple[int, ...] | None = None) -> NamedSharding:
  """NamedSharding of an activation/batch array (e.g. `("batch", "seq")`) under `layout`.

  With `shape`, divisibility is checked (e.g. a batch of 6 on data x fsdp = 4 raises).
  """
  check_rules(layout)
  shape = shape if shape is not None else (0,) * len(logical)
  spec = spec_for(logical, shape, layout, ACTIVATION_RULES, what="activation")
  return NamedSharding(layout.mesh, spec)

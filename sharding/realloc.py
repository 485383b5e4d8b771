"""Parameter reallocation: move a pytree of arrays to other `NamedSharding`s, on the devices only.

`reallocate(tree, target_shardings)` handles any pair of source and target NamedShardings: the same
devices with another spec, overlapping or disjoint device sets, different device counts, other
axis orders, replicated <-> sharded, any dtype, scalars and empty subtrees. Nothing goes through
the host, so it runs under `jax.transfer_guard("disallow")`. It also works across processes
(`jax.distributed`): every process calls it with the same arguments in the same order.

Why not `jax.device_put(x, target)`: it stays on the accelerators only when every target shard is
exactly a source shard; otherwise it gathers the whole array to host numpy (DESIGN.md section 4).

Algorithm, per leaf (planning in `sharding/_realloc_plan.py`, pure and cached):

1. Regions. Each device of the target holds a box (region) of the array. Let t_i be the number of
   distinct target blocks along dimension i (the target grid).
2. Intermediate. Enumerate layouts I over the *source* devices (in the source mesh's device order,
   as `jit` requires) whose grid g divides the target grid per dimension (g_i | t_i) with prod(g)
   dividing the source device count N (the rest of the devices replicate), expressible on a
   3-axis mesh, trying every assignment of grid dims and replication to mesh axes. Each I shard is
   then a union of target shards. The source layout itself is a candidate too (no reshard) when
   every target region already sits inside one source shard, and g = (1, ...) (all-gather) always
   qualifies, so a plan always exists.
3. Copies. Each target device takes its region from a source device that holds it in I: itself
   if possible (no copy), else the least-loaded holder, preferring the same process. If the I
   shard is larger than the region, a jitted local slice on the source device cuts it out.
4. Cost. Every candidate is priced with the `Hardware` model (reshard bytes received per device
   / collective bandwidth + local slice bytes / HBM + busiest link's bytes / d2d bandwidth +
   per-transfer latency) and the cheapest wins; `realloc_cost` sums these predictions.
5. Execution: `jit(identity, out_shardings=I)` on the source mesh, local slices, one batched
   `device_put` of single-device shards to their target devices, then
   `jax.make_array_from_single_device_arrays` with the target sharding. No host round trip.

Cases: N -> M with M > N (target shards finer than source devices can hold apart) gets g
coarser than the target grid and local slices; replicated targets take each copy from a
different holder when possible; same-device reshards (I equals the target) move nothing after
the collective.

Memory: leaves go in buckets of at most `bucket_bytes` (a single larger leaf is its own bucket).
Before a bucket is dispatched the bucket two steps back is waited for, so at most two buckets'
intermediates (each <= bucket_bytes, times the replication of I) are alive per device beyond
the source and the result. `bucket_bytes=None` dispatches everything without waiting.
`donate=True` deletes each source leaf right after its last use is dispatched (a cross-device
`device_put(donate=True)` would not free it); a leaf whose buffers the result reuses (a target
shard that is literally a source shard on the same device) is left for the garbage collector.

Multi-process: cross-process pieces move with `device_put` between single-device shardings on
both processes (JAX's DCN transfer; on CPU it needs `jax_force_dcn_cross_host_transfers` and
`jax_cross_host_transfer_socket_address`); a process builds an empty placeholder for a piece
that lives on another process's device. The reshard in step 2 runs as one SPMD program on the
source devices, so with a source mesh spanning processes the CPU backend needs collectives
(`jax_cpu_collectives_implementation='gloo'`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, SingleDeviceSharding

from sharding import hardware as _hw
from sharding._realloc_plan import LeafPlan, plan_leaf

DEFAULT_BUCKET_BYTES = 1 << 30


@functools.lru_cache(maxsize=None)
def _reshard_fn(inter: NamedSharding):
  return jax.jit(lambda a: a, out_shardings=inter)


@functools.lru_cache(maxsize=None)
def _slice_fn(local):
  starts = tuple(a for a, _ in local)
  stops = tuple(b for _, b in local)
  return jax.jit(lambda a: jax.lax.slice(a, starts, stops))


def _targets_like(tree, target_shardings):
  leaves, treedef = jax.tree.flatten(tree)
  if isinstance(target_shardings, NamedSharding):
    return leaves, treedef, [target_shardings] * len(leaves)
  targets = treedef.flatten_up_to(target_shardings)
  for t in targets:
    if not isinstance(t, NamedSharding):
      raise TypeError(f"reallocate: target shardings must be NamedSharding, got {type(t).__name__}")
  return leaves, treedef, targets


def _plan(x, target: NamedSharding, hw, mode="auto") -> LeafPlan:
  if not isinstance(x, jax.Array) or not isinstance(x.sharding, NamedSharding):
    raise TypeError(f"reallocate: leaves must be jax.Arrays with a NamedSharding, got "
                    f"{type(x).__name__} with {getattr(x, 'sharding', None)}")
  return plan_leaf(tuple(x.shape), np.dtype(x.dtype).itemsize, x.sharding, target, hw, mode)


def _buckets(leaves, bucket_bytes):
  if bucket_bytes is None:
    return [list(range(len(leaves)))]
  out, cur, size = [], [], 0
  for i, x in enumerate(leaves):
    n = x.size * np.dtype(x.dtype).itemsize
    if cur and size + n > bucket_bytes:
      out.append(cur)
      cur, size = [], 0
    cur.append(i)
    size += n
  if cur:
    out.append(cur)
  return out


@functools.lru_cache(maxsize=None)
def _empty_fn(shape, dtype, target):
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=target)


@functools.lru_cache(maxsize=None)
def _assemble_fn(shape, offsets):
  def f(*ps):
    out = jnp.zeros(shape, ps[0].dtype)
    for p, o in zip(ps, offsets):
      out = jax.lax.dynamic_update_slice(out, p, o)
    return out
  return jax.jit(f)


def _move_bucket(items, donate):
  """items: list of (x, target, plan). Returns the moved arrays, in order."""
  me = jax.process_index()
  # 1. Reshard on the source meshes (one jitted identity per leaf, dispatched back to back).
  inters = []
  for x, _, p in items:
    if p.inter is None:
      inters.append(x)
    elif any(d.process_index == me for d in p.inter.device_set):
      inters.append(_reshard_fn(p.inter)(x))
    else:
      inters.append(None)  # Source entirely on other processes: they do the reshard.
  # 2. Local slices and the list of copies (same order on every process).
  got: list[dict] = []
  put_x, put_dst, put_at = [], [], []
  for k, ((x, target, p), y) in enumerate(zip(items, inters)):
    local = {sh.device: sh.data for sh in y.addressable_shards} if y is not None else {}
    g: dict = {}
    for i, s in enumerate(p.pieces):
      src_mine, dst_mine = s.src.process_index == me, s.dst.process_index == me
      if not (src_mine or dst_mine):
        continue
      if src_mine:
        piece = local[s.src]
        if s.local is not None:
          piece = _slice_fn(s.local)(piece)
      else:
        piece = jax.make_array_from_single_device_arrays(s.shape, SingleDeviceSharding(s.src), [],
                                                         dtype=x.dtype)
      if s.src == s.dst:
        g[i] = piece
      else:
        put_x.append(piece)
        put_dst.append(SingleDeviceSharding(s.dst))
        put_at.append((k, i, dst_mine))
    got.append(g)
  # 3. All copies of the bucket in one batched device_put.
  if put_x:
    for (k, i, dst_mine), out in zip(put_at, jax.device_put(put_x, put_dst)):
      if dst_mine:
        got[k][i] = out
  # 4. Assemble pieces, build the target arrays; free donated sources.
  results = []
  for (x, target, p), g in zip(items, got):
    if p.identical and x.sharding == target:
      results.append(x)
      continue
    if x.size == 0:
      results.append(_empty_fn(tuple(x.shape), x.dtype, target)())
      if donate:
        x.delete()
      continue
    shards, parts = {}, {}
    for i, s in enumerate(p.pieces):
      if s.dst.process_index != me:
        continue
      if s.whole:
        shards[s.dst] = g[i]
      else:
        parts.setdefault(s.dst, []).append((s.offset, g[i]))
    for d, ps in parts.items():
      shards[d] = _assemble_fn(target.shard_shape(tuple(x.shape)), tuple(o for o, _ in ps))(*(a for _, a in ps))
    arrays = [shards[d] for d in target.mesh.devices.flat if d in shards]
    results.append(jax.make_array_from_single_device_arrays(tuple(x.shape), target, arrays, dtype=x.dtype))
    if donate and not _aliases(p):
      x.delete()
  return results


def _aliases(p: LeafPlan) -> bool:
  """True when some result shard is a source buffer itself (no reshard, no slice, no copy)."""
  return p.inter is None and any(s.src == s.dst and s.local is None and s.whole for s in p.pieces)


def reallocate(tree: Any, target_shardings: Any, *, donate: bool = False,
               bucket_bytes: int | None = DEFAULT_BUCKET_BYTES, hardware: _hw.Hardware | None = None,
               mode: str = "auto") -> Any:
  """Moves every array of `tree` to its target NamedSharding, device to device.

  Args:
    tree: a pytree of `jax.Array`s with NamedShardings (empty subtrees are fine).
    target_shardings: a matching pytree of NamedSharding (or a tree prefix of it, or one
      NamedSharding for every leaf).
    donate: delete the source arrays once their data is on its way (see module docstring).
    bucket_bytes: peak-memory bound: leaves move in buckets of at most this many bytes, with at
      most two buckets in flight. None: no bound, no waiting.
    hardware: the profile the planner prices candidate plans with (default `hardware.DEFAULT`).
    mode: "auto" (cheapest plan), or force "reshard" or "pieces" plans (see module docstring).

  Returns:
    A pytree like `tree` whose leaves have exactly the target shardings and bitwise the same values.
  """
  hw = hardware or _hw.DEFAULT
  leaves, treedef, targets = _targets_like(tree, target_shardings)
  plans = [_plan(x, t, hw, mode) for x, t in zip(leaves, targets)]
  out: list = [None] * len(leaves)
  inflight: list[list] = []
  for bucket in _buckets(leaves, bucket_bytes):
    if bucket_bytes is not None and len(inflight) >= 2:
      jax.block_until_ready(inflight.pop(0))
    moved = _move_bucket([(leaves[i], targets[i], plans[i]) for i in bucket], donate)
    for i, y in zip(bucket, moved):
      out[i] = y
    inflight.append(moved)
  return jax.tree.unflatten(treedef, out)


def realloc_cost(src_shardings: Any, dst_shardings: Any, tree_shapes: Any,
                 hardware: _hw.Hardware | None = None, mode: str = "auto") -> float:
  """Predicted seconds for `reallocate` to move `tree_shapes` from `src_shardings` to `dst_shardings`.

  `tree_shapes` is a pytree of anything with `.shape` and `.dtype` (e.g. `jax.ShapeDtypeStruct`);
  the sharding trees match it (or are prefixes of it, or single NamedShardings). The estimate is
  the sum over leaves of the chosen plan's time: reshard bytes received per device over the
  collective bandwidth, local slices over HBM bandwidth, the busiest device's copy bytes over
  the device-to-device (or inter-host) bandwidth, plus per-transfer latency.
  """
  hw = hardware or _hw.DEFAULT
  leaves, treedef = jax.tree.flatten(tree_shapes)

  def per_leaf(shardings):
    if isinstance(shardings, NamedSharding):
      return [shardings] * len(leaves)
    return treedef.flatten_up_to(shardings)

  total = 0.0
  for x, s, d in zip(leaves, per_leaf(src_shardings), per_leaf(dst_shardings)):
    total += plan_leaf(tuple(x.shape), np.dtype(x.dtype).itemsize, s, d, hw, mode).seconds
  return total


def plans(tree: Any, target_shardings: Any, hardware: _hw.Hardware | None = None,
          mode: str = "auto") -> Sequence[LeafPlan]:
  """The per-leaf plans `reallocate` would use (for inspection, tests and benchmarks)."""
  hw = hardware or _hw.DEFAULT
  leaves, _, targets = _targets_like(tree, target_shardings)
  return [_plan(x, t, hw, mode) for x, t in zip(leaves, targets)]

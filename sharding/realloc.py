"""Parameter reallocation: move a pytree of arrays to other `NamedSharding`s, on the devices only.

`reallocate(tree, target_shardings)` handles any pair of source and target NamedShardings: the same
devices with another spec, overlapping or disjoint device sets, different device counts, other
axis orders, replicated <-> sharded, any dtype, scalars and empty subtrees. Nothing goes through
the host, so it runs under `jax.transfer_guard("disallow")`. It also works across processes
(`jax.distributed`): every process calls it with the same arguments in the same order.

Why not `jax.device_put(x, target)`: it stays on the accelerators only when every target shard is
exactly a source shard; otherwise it gathers the whole array to host numpy (DESIGN.md section 4).

Fast path: a leaf whose source and target share the same device list (in order) moves with one
jitted identity with `out_shardings=target`; XLA emits the all-to-all / all-gather / slices. All
such leaves of a bucket go in ONE program (one dispatch per bucket and device list).

General algorithm, per leaf (planning in `sharding/_realloc_plan.py`, pure and cached):

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
   per-transfer latency) and the cheapest wins. `realloc_cost` prices the whole executed path per
   bucket: host time (program dispatches, transfers, per-leaf work) against device time
   (collectives, pack/unpack in HBM, the busiest device pair's bytes), the larger of the two.
5. Execution, per bucket, not per leaf: ONE `jit(identity, out_shardings=[I...])` per source device
   list over all the bucket's leaves that need a reshard; per source device ONE jitted "pack" that
   cuts every piece going elsewhere out of its local shards and concatenates them into one flat
   buffer per (target device, dtype); ONE batched `device_put` of those buffers; per target device
   ONE jitted "unpack" that cuts the received buffers (and local slices) back into target shards;
   then `jax.make_array_from_single_device_arrays` per leaf. So a bucket costs a handful of
   dispatches and about (source devices x target devices) transfers whatever its leaf count.
   Plans and jitted programs are cached by the tree's (shapes, dtypes, shardings): a repeated
   reallocation of the same tree costs only dispatch. No host round trip.

Cases: N -> M with M > N (target shards finer than source devices can hold apart) gets g
coarser than the target grid and local slices; replicated targets take each copy from a
different holder when possible; same-device reshards (I equals the target) move nothing after
the collective.

Memory: leaves go in buckets of at most `bucket_bytes` (a single larger leaf is its own bucket).
Buckets are software-pipelined: bucket b's reshard, packs and transfers are dispatched before
bucket b-1's unpacks and assembly, so the copies of consecutive buckets run back to back on the
links while packing and unpacking overlap them (on one compute stream per device, an unpack of b-1
that waits for its copies would otherwise hold back the pack of b; on 4x H100 this took 7B
fsdp4 -> tensor2 from 66 to 57 ms, while the 2 -> 4 device case stays host-bound by per-leaf
work, bench/README.md). Before bucket b is dispatched, bucket b-2 is waited for, so at most two
buckets' intermediates (each <= bucket_bytes, times the replication of I) are alive per device beyond
the source and the result. `bucket_bytes=None` dispatches everything without waiting.
`donate=True` deletes each source leaf right after its last use is dispatched (a cross-device
`device_put(donate=True)` would not free it); a leaf whose buffers the result reuses (a target
shard that is literally a source shard on the same device) is left for the garbage collector.

Multi-process: cross-process buffers move with `device_put` between single-device shardings on
both processes (JAX's DCN transfer; on CPU it needs `jax_force_dcn_cross_host_transfers` and
`jax_cross_host_transfer_socket_address`); a process builds an empty placeholder for a buffer
that lives on another process's device. Each cross-process buffer goes in its OWN `device_put`
call, in the same global order on every process: a batched `device_put` of several cross-process
arrays pairs senders' and receivers' buffers in orders that differ between the processes (jax
0.12 CPU: 4 arrays from process 0's devices to process 1's arrived permuted, a different
permutation from run to run; one call per array is exact). With unequal sizes that mis-pairing
hangs. Every plan is a pure function of the global shardings, so all processes build the same
buckets, programs and buffer order. The reshard in step 2 runs as one SPMD program on the
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
from sharding._realloc_plan import BucketPlan, LeafPlan, LeafSpec, plan_leaf, plan_tree

DEFAULT_BUCKET_BYTES = 1 << 30
_PIPELINE = True  # False: each bucket sent and received before the next (for A/B benchmarks only).


def _targets_like(tree, target_shardings):
  leaves, treedef = jax.tree.flatten(tree)
  if isinstance(target_shardings, NamedSharding):
    return leaves, treedef, [target_shardings] * len(leaves)
  targets = treedef.flatten_up_to(target_shardings)
  for t in targets:
    if not isinstance(t, NamedSharding):
      raise TypeError(f"reallocate: target shardings must be NamedSharding, got {type(t).__name__}")
  return leaves, treedef, targets


def _spec(x, target: NamedSharding) -> LeafSpec:
  if not isinstance(x, jax.Array) or not isinstance(x.sharding, NamedSharding):
    raise TypeError(f"reallocate: leaves must be jax.Arrays with a NamedSharding, got "
                    f"{type(x).__name__} with {getattr(x, 'sharding', None)}")
  return LeafSpec(tuple(x.shape), np.dtype(x.dtype).name, x.sharding, target)


def _plan(x, target: NamedSharding, hw, mode="auto") -> LeafPlan:
  s = _spec(x, target)
  return plan_leaf(s.shape, np.dtype(s.dtype).itemsize, s.src, s.dst, hw, mode)


def _local_order(s: NamedSharding, me: int) -> dict[jax.Device, int]:
  """Device -> position in the array's addressable shards (the sharding's device order)."""
  return {d: i for i, d in enumerate(d for d in s.mesh.devices.flat if d.process_index == me)}


def _local_arrays(y) -> list:
  arrays = getattr(y, "_arrays", None)  # The per-device buffers, in addressable device order.
  if arrays is None:
    return [sh.data for sh in y.addressable_shards]
  return arrays


def _cut(a, local):
  if local is None:
    return a
  return jax.lax.slice(a, tuple(b for b, _ in local), tuple(e for _, e in local))


@functools.lru_cache(maxsize=None)
def _identity_fn(out_shardings: tuple, donate: bool):
  n = len(out_shardings)
  return jax.jit(lambda *xs: xs, out_shardings=out_shardings,
                 donate_argnums=tuple(range(n)) if donate else ())


@functools.lru_cache(maxsize=None)
def _empty_fn(shape, dtype, target):
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=target)


class _BucketProgram:
  """The jitted programs of one bucket for this process, built once per (tree plan, bucket)."""

  def __init__(self, specs, bp: BucketPlan, me: int):
    self.bp = bp
    self.me = me
    self.same = []    # (leaf indices, jitted identity)
    for devs, ks in bp.same:
      if any(d.process_index == me for d in devs):
        self.same.append((ks, _identity_fn(tuple(specs[k].dst for k in ks), False)))
    self.reshard = []
    for devs, ks in bp.reshard:
      if any(d.process_index == me for d in devs):
        self.reshard.append((ks, _identity_fn(tuple(bp.leaf_plans[k].inter for k in ks), False)))
    # Where each general leaf's pieces are cut from: its intermediate (or source) layout.
    self.general = [k for k in bp.leaves if bp.kinds[k] == "general"]
    self.keep = [k for k in bp.leaves if bp.kinds[k] == "keep"]
    self.empty = [k for k in bp.leaves if bp.kinds[k] == "empty"]
    view = {k: (bp.leaf_plans[k].inter or specs[k].src) for k in self.general}
    self.view_order = {k: _local_order(view[k], me) for k in self.general}
    self.has_local = [k for k in self.general if self.view_order[k]]
    self.checked = False
    # Pack: per source device of this process, every outgoing piece, one buffer per (dst, dtype).
    packs: dict = {}
    self.puts = []  # (key, src mine, dst mine, n elements)
    for key, segs in bp.transfers.items():
      src, dst, dtype = key
      if src.process_index != me and dst.process_index != me:
        continue
      n = sum(int(np.prod(bp.leaf_plans[k].pieces[i].shape)) for k, i in segs)
      self.puts.append((key, src.process_index == me, dst.process_index == me, n))
      if src.process_index == me:
        packs.setdefault(src, []).append(key)
    self.packs = []  # (src device, [(leaf, position)] inputs, [key] outputs, jitted fn)
    for src, keys in packs.items():
      inputs = sorted({k for key in keys for k, _ in bp.transfers[key]})
      slot = {k: j for j, k in enumerate(inputs)}
      recipe = tuple(tuple((slot[k], bp.leaf_plans[k].pieces[i].local) for k, i in bp.transfers[key])
                     for key in keys)
      self.packs.append((src, [(k, self.view_order[k][src]) for k in inputs], keys, _pack_fn(recipe)))
    # Unpack: per target device of this process, every target shard not passed through as is.
    self.passthrough = {}  # (leaf, dst) -> position of the source buffer in the view's local arrays
    unpacks: dict = {}
    for k in self.general:
      p = bp.leaf_plans[k]
      by_dst: dict = {}
      for i, pc in enumerate(p.pieces):
        if pc.dst.process_index == me:
          by_dst.setdefault(pc.dst, []).append(i)
      for dst, idx in by_dst.items():
        pc = p.pieces[idx[0]]
        if len(idx) == 1 and pc.whole and pc.src == dst and pc.local is None:
          self.passthrough[k, dst] = self.view_order[k][dst]
        else:
          unpacks.setdefault(dst, []).append((k, idx))
    self.unpacks = []  # (dst, buffer keys, local inputs [(leaf, position)], outputs [leaf], fn)
    for dst, jobs in unpacks.items():
      keys = [key for key, _, dmine, _ in self.puts if dmine and key[1] == dst]
      where = {}  # (leaf, piece) -> (buffer slot, start, stop)
      for b, key in enumerate(keys):
        off = 0
        for k, i in bp.transfers[key]:
          n = int(np.prod(bp.leaf_plans[k].pieces[i].shape))
          where[k, i] = (b, off, off + n)
          off += n
      local_leaves = sorted({k for k, idx in jobs for i in idx if bp.leaf_plans[k].pieces[i].src == dst})
      lslot = {k: len(keys) + j for j, k in enumerate(local_leaves)}
      recipe = []
      for k, idx in jobs:
        p = bp.leaf_plans[k]
        shard_shape = specs[k].dst.shard_shape(specs[k].shape)
        parts = []
        for i in idx:
          pc = p.pieces[i]
          if pc.src == dst:
            parts.append(("local", lslot[k], pc.local, pc.offset, pc.shape))
          else:
            parts.append(("buf",) + where[k, i] + (pc.offset, pc.shape))
        recipe.append((tuple(shard_shape), specs[k].dtype, tuple(parts), p.pieces[idx[0]].whole and len(idx) == 1))
      self.unpacks.append((dst, keys, [(k, self.view_order[k][dst]) for k in local_leaves],
                           [k for k, _ in jobs], _unpack_fn(tuple(recipe))))
    # Result assembly order: the target's addressable devices.
    self.target_devs = {k: [d for d in specs[k].dst.mesh.devices.flat if d.process_index == me]
                        for k in self.general}

  def send(self, leaves, out):
    """First half: same-device and intermediate reshards, packs, transfers (all dispatched, none
    waited for). Returns what `recv` needs."""
    for ks, fn in self.same:
      for k, y in zip(ks, fn(*(leaves[k] for k in ks))):
        out[k] = y
    view = {k: leaves[k] for k in self.general}
    for ks, fn in self.reshard:
      for k, y in zip(ks, fn(*(leaves[k] for k in ks))):
        view[k] = y
    local = {k: _local_arrays(view[k]) for k in self.has_local}
    if not self.checked:  # Once per program: the assumed shard order is the real one.
      for k, arrs in local.items():
        devs = [sh.device for sh in view[k].addressable_shards]
        assert devs == sorted(self.view_order[k], key=self.view_order[k].get), (devs, self.view_order[k])
      self.checked = True
    bufs = {}
    for src, inputs, keys, fn in self.packs:
      for key, b in zip(keys, fn(*(local[k][j] for k, j in inputs))):
        bufs[key] = b
    put_x, put_dst, put_keys = [], [], []
    for key, smine, dmine, n in self.puts:
      src, dst, dtype = key
      if smine:
        x = bufs[key]
      else:  # Lives on another process: an empty placeholder on its device.
        x = jax.make_array_from_single_device_arrays((n,), SingleDeviceSharding(src), [], dtype=dtype)
      put_x.append(x)
      put_dst.append(SingleDeviceSharding(dst))
      put_keys.append(key)
    received = {}
    same_proc = [j for j, key in enumerate(put_keys) if key[0].process_index == key[1].process_index]
    if same_proc:  # Inside this process: one batched call.
      for j, y in zip(same_proc, jax.device_put([put_x[j] for j in same_proc], [put_dst[j] for j in same_proc])):
        received[put_keys[j]] = y
    for j, key in enumerate(put_keys):
      # Across processes: one call per buffer, in the global order. A batched call groups its
      # arrays by (source, destination) devices in an order that differs between processes, so
      # the transfer keys pair up the wrong buffers (wrong values, then a hang on a size mismatch).
      if key[0].process_index != key[1].process_index:
        received[key] = jax.device_put(put_x[j], put_dst[j])
    return local, received

  def recv(self, state, leaves, targets, out, donate):
    """Second half: per-target-device unpack programs, per-leaf result arrays, donation."""
    bp = self.bp
    local, received = state
    shards: dict = {}
    for (k, dst), j in self.passthrough.items():
      shards[k, dst] = local[k][j]
    for dst, keys, linputs, outs, fn in self.unpacks:
      args = [received[key] for key in keys] + [local[k][j] for k, j in linputs]
      for k, y in zip(outs, fn(*args)):
        shards[k, dst] = y
    for k in self.keep:
      out[k] = leaves[k]
    for k in self.empty:
      x = leaves[k]
      out[k] = _empty_fn(tuple(x.shape), x.dtype, targets[k])()
    for k in self.general:
      x = leaves[k]
      out[k] = jax.make_array_from_single_device_arrays(
          x.shape, targets[k], [shards[k, d] for d in self.target_devs[k]], dtype=x.dtype)
    if donate:
      aliased = {id(leaves[k]) for k, _ in self.passthrough if bp.leaf_plans[k].inter is None}
      aliased |= {id(leaves[k]) for k in bp.leaves if bp.kinds[k] == "keep"}
      seen = set()
      for k in bp.leaves:
        x = leaves[k]
        if id(x) in aliased or id(x) in seen or x.is_deleted():
          continue
        seen.add(id(x))
        x.delete()
    return [out[k] for k in bp.leaves]


@functools.lru_cache(maxsize=None)
def _pack_fn(recipe):
  """recipe: per output buffer, ((input slot, local box or None), ...): the flat concatenation."""
  def f(*xs):
    outs = []
    for parts in recipe:
      flat = [_cut(xs[j], box).reshape(-1) for j, box in parts]
      outs.append(flat[0] if len(flat) == 1 else jnp.concatenate(flat))
    return tuple(outs)
  return jax.jit(f)


@functools.lru_cache(maxsize=None)
def _unpack_fn(recipe):
  """recipe: per output shard (shape, dtype, parts, whole); a part is ("buf", slot, start, stop,
  offset, shape) or ("local", slot, box, offset, shape)."""
  def piece(xs, part):
    if part[0] == "buf":
      _, j, a, b, _, shape = part
      return xs[j][a:b].reshape(shape)
    _, j, box, _, _ = part
    return _cut(xs[j], box)

  def f(*xs):
    outs = []
    for shape, dtype, parts, whole in recipe:
      if whole:
        outs.append(piece(xs, parts[0]))
        continue
      y = jnp.zeros(shape, dtype)
      for part in parts:
        y = jax.lax.dynamic_update_slice(y, piece(xs, part), part[-2])
      outs.append(y)
    return tuple(outs)
  return jax.jit(f)


@functools.lru_cache(maxsize=64)
def _programs(specs: tuple[LeafSpec, ...], hw, mode: str, bucket_bytes, me: int):
  tp = plan_tree(specs, hw, mode, bucket_bytes)
  return [_BucketProgram(specs, bp, me) for bp in tp.buckets]


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
    mode: "auto" (same-device fast path, else the cheapest plan), or force "reshard" or "pieces"
      plans for every leaf (see module docstring).

  Returns:
    A pytree like `tree` whose leaves have exactly the target shardings and bitwise the same values.
  """
  hw = hardware or _hw.DEFAULT
  leaves, treedef, targets = _targets_like(tree, target_shardings)
  specs = tuple(_spec(x, t) for x, t in zip(leaves, targets))
  progs = _programs(specs, hw, mode, bucket_bytes, jax.process_index())
  out: list = [None] * len(leaves)
  inflight: list[list] = []
  pending = None  # (program, state): the previous bucket, sent but not yet received.
  for prog in progs:
    if bucket_bytes is not None and len(inflight) >= (1 if _PIPELINE else 2):
      jax.block_until_ready(inflight.pop(0))  # Pipelined: bucket b-2 done, at most b-1 and b alive.
    # Software pipeline: this bucket's packs and transfers are dispatched BEFORE the previous
    # bucket's unpacks. A device that both sends and receives runs its programs in order on one
    # compute stream; with send(b+1) queued after recv(b) (which waits for bucket b's copies), the
    # copies of b+1 could not start before the copies of b had finished and been unpacked.
    state = prog.send(leaves, out)
    if not _PIPELINE:  # The previous schedule: send(b), recv(b), waiting for bucket b-2.
      inflight.append(prog.recv(state, leaves, targets, out, donate))
      continue
    if pending is not None:
      inflight.append(pending[0].recv(pending[1], leaves, targets, out, donate))
    pending = (prog, state)
  if pending is not None:
    inflight.append(pending[0].recv(pending[1], leaves, targets, out, donate))
  return jax.tree.unflatten(treedef, out)


def _per_leaf(shardings, treedef, n):
  if isinstance(shardings, NamedSharding):
    return [shardings] * n
  return treedef.flatten_up_to(shardings)


def realloc_cost(src_shardings: Any, dst_shardings: Any, tree_shapes: Any,
                 hardware: _hw.Hardware | None = None, mode: str = "auto",
                 bucket_bytes: int | None = DEFAULT_BUCKET_BYTES) -> float:
  """Predicted seconds for `reallocate` to move `tree_shapes` from `src_shardings` to `dst_shardings`.

  `tree_shapes` is a pytree of anything with `.shape` and `.dtype` (e.g. `jax.ShapeDtypeStruct`);
  the sharding trees match it (or are prefixes of it, or single NamedShardings). It prices the path
  `reallocate` executes, bucket by bucket: host time (program dispatches, transfers, per-leaf
  work) against device time (collective bytes received per device over the collective bandwidth,
  pack/unpack copies over HBM, the busiest device pair's bytes over the d2d bandwidth), the
  larger of the two, summed over buckets.
  """
  hw = hardware or _hw.DEFAULT
  leaves, treedef = jax.tree.flatten(tree_shapes)
  specs = tuple(LeafSpec(tuple(x.shape), np.dtype(x.dtype).name, s, d)
                for x, s, d in zip(leaves, _per_leaf(src_shardings, treedef, len(leaves)),
                                   _per_leaf(dst_shardings, treedef, len(leaves))))
  return plan_tree(specs, hw, mode, bucket_bytes).seconds


def plans(tree: Any, target_shardings: Any, hardware: _hw.Hardware | None = None,
          mode: str = "auto") -> Sequence[LeafPlan]:
  """The per-leaf plans of the general path (for inspection, tests and benchmarks; leaves on the
  same-device fast path get one too, priced as if they took the general path)."""
  hw = hardware or _hw.DEFAULT
  leaves, _, targets = _targets_like(tree, target_shardings)
  return [_plan(x, t, hw, mode) for x, t in zip(leaves, targets)]

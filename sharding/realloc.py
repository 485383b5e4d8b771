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
   if possible, else the least-loaded holder, preferring the same process.
4. Cost. Every candidate is priced with the `Hardware` model (`_realloc_plan.plan_leaf`: reshard
   bytes received per device / collective bandwidth + one collective's latency + XLA's layout
   copies, pack and unpack copies in HBM, the busiest link's bytes / d2d bandwidth, host work) and
   the cheapest wins. A plan where every target shard is literally its own device's I shard
   ("pass-through") copies nothing. `realloc_cost` simulates the whole executed path
   (`sharding/_realloc_cost.py`): the host dispatching bucket after bucket, each device's compute
   stream, the links.
5. Cells and classes. Every target shard of a general leaf is cut into a grid of cells that is the
   same on all target devices (the union of the pieces' cut points), so each cell lies in one
   piece everywhere. Cells of a bucket that every target device takes from the same device as
   each other (same target mesh, dtype and source per target device) form a *class*: per target
   device ONE flat buffer, the cells' elements concatenated in a fixed order, so the buffers of
   all target devices have the same layout. A cell that is a whole I shard on every target device
   is, with `direct=True`, a *direct* class of its own: that shard is the buffer, with no pack (the
   default `direct=False` packs it like the others: faster on 2x H200, see `DEFAULT_DIRECT`).
6. Execution, per bucket, with no Python work per leaf: ONE `jit(identity, out_shardings=[I...])`
   per source device list over all the bucket's leaves that need a reshard; per source device
   ONE jitted "pack" that cuts every packed class buffer it serves (its own device's included) out
   of its local shards; per round, ONE batched `device_put` of the buffers that change device (a
   direct class's shards as they are; a source device's copies to its k-th destination go in round
   k, the destinations ordered so that each round spreads over the targets: a GPU sends its copies
   one after another in issue order, `_realloc_plan._transfer_slots`); per class ONE global array
   over the target mesh made of its buffers (`make_array_from_single_device_arrays`; a direct
   class's shard on its own device is used in place); per target mesh ONE jitted `shard_map`
   "unpack" whose inputs are the class arrays and whose OUTPUTS are the bucket's target arrays
   with their target shardings (every device slices the same offsets of its own buffers, so one
   SPMD program serves all of them; XLA creates the global arrays). Pass-through leaves are
   assembled from their buffers as they are (one Python array each, no copy). A bucket thus costs a
   handful of dispatches, one transfer per (class, target device) and one Python array per class,
   whatever its leaf count. Plans and programs are cached by the leaves' (shapes, dtypes, shardings)
   and the targets: a repeated reallocation finds them with one dict lookup and only dispatches. No
   host round trip.

Targets inside the source mesh ("gather" transitions, e.g. fsdp2 -> one of its devices): with
`direct=True` two plans compete per leaf, and the HBM passes decide (with the default
`direct=False`, (b) below is the packed general path instead). (a) All-gather (or gather partly) in the source mesh
into an intermediate whose shards on the target devices are the target shards, then keep those
buffers (pass-through): NCCL writes the result straight, no further copy, when the gathered
dimension is the array's major one. Along a minor dimension XLA:GPU copies the operand into and
the result out of a layout with that dimension major (`_realloc_plan.reshard_bytes`): three more
passes over the data, on every source device. (b) Direct classes: each remote whole shard is copied
as it is and each target device's unpack concatenates it with its own shard, read in place: one
pass (read + write of the target shard), on the target devices only, which the copies of the next
bucket overlap (pipelined schedule). 7B stacked fsdp2 -> single on 2x H100: (a) was the old plan
(34 ms against a 17.9 ms raw copy); (b) is priced at ~20 ms.

Cases: N -> M with M > N (target shards finer than source devices can hold apart) gets g
coarser than the target grid and local slices; replicated targets take each copy from a
different holder when possible; same-device reshards (I equals the target) move nothing after
the collective.

Memory: leaves go in buckets of at most `bucket_bytes` (a single larger leaf is its own bucket).
Schedule (`schedule=`): "serial" dispatches bucket b's reshard, packs, transfers and unpack before
bucket b+1's; "pipelined" dispatches bucket b's reshard, packs and transfers before bucket b-1's
unpacks; "auto" (the default) runs the one `realloc_cost` predicts faster for the tree (serial on a
tie). Why it matters: a copy's destination buffer is allocated in its device's compute-stream
order, so under "serial" bucket b+1's copies into a device wait for bucket b's unpack there, which
waits for bucket b's copies; "pipelined" lets the links carry consecutive buckets' copies back to
back. Measured (2x H100, stacked trees, the cell-classes implementation): single -> fsdp2 7B 25.2 ms
serial, 21.4 pipelined (the simulation: 26.0 and 21.8); same-device and gather plans equal either
way. Caveat: on the 291-leaf per-layer trees the pipelined schedule was 13-20% slower on the
general path (4x H100 and 2x H100), which the simulation does not reproduce (it predicts it
faster); real_jax moves stacked trees (a few leaves per bucket). Before a bucket with intermediates
(reshard outputs, packed and received buffers) is dispatched, the one two before it is waited for,
so at most two buckets' intermediates (each <= bucket_bytes, times the replication of I) are alive
per device beyond the source and the result. Buckets of same-device reshards only hold XLA's
temporaries while they run and are never waited for. `bucket_bytes=None` dispatches everything
without waiting. `donate=True` deletes each source leaf right after its last use is dispatched (a
cross-device `device_put(donate=True)` would not free it; the programs and copies already
dispatched keep their buffers until they are done); a leaf whose buffers the result reuses (a
pass-through target shard that is literally a source shard) is left for the garbage collector.

Multi-process: cross-process class buffers move with `device_put` between single-device shardings on
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
(`jax_cpu_collectives_implementation='gloo'`). The unpack has no collectives: every process with
devices in the target mesh runs it on its own buffers; a process with none gets the result as an
array without addressable shards.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from sharding import hardware as _hw
from sharding._realloc_plan import SCHEDULES  # noqa: F401 - re-exported: the schedules `reallocate` runs
from sharding._realloc_plan import PLAN_SCHEDULES, BucketPlan, LeafPlan, LeafSpec, plan_leaf, plan_tree

__all__ = ["DEFAULT_BUCKET_BYTES", "DEFAULT_SCHEDULE", "PLAN_SCHEDULES", "SCHEDULES", "plans", "realloc_cost",
           "reallocate"]

# 2 GiB: in the three 4x H200 runs with copy rounds (bench/results/realloc-h200x4{,-rounds1g}.json; the
# variants bucket2g / bucket1g beside the default), 2 GiB buckets were as fast or faster on 19 of the 24
# (transition, run) pairs, up to 18% faster (7B fsdp4 -> tensor2 (2 of 4): 15.8 against 19.3 ms) and at most
# 0.5 ms slower (1B calls of 2-5 ms). The difference is host time, ~1.5 ms of dispatches per bucket, and the
# 7B attention weights are exactly 1 GiB each (one bucket apiece at 1 GiB). At most two buckets'
# intermediates are alive, so the bound is a few GiB per device.
DEFAULT_BUCKET_BYTES = 2 << 30
DEFAULT_SCHEDULE = "auto"  # The schedule realloc_cost predicts faster for the tree (module docstring: Schedule).
# Direct classes off by default: on 2x H200 (bench/results/realloc-h200x2.json, every cell packed is the
# "packed" variant there) packing every cell was as fast or faster on 7 of 8 stacked transitions, and
# on fsdp2 -> single (1 of 2) it reached 0.89 / 0.91 of the raw copy (7B / 1B) against 0.89 / 0.69
# with direct classes. `direct=True` keeps them.
DEFAULT_DIRECT = False
_wait = jax.block_until_ready  # The memory bound's waits (a name of its own for tests).


def _targets_like(tree, target_shardings):
  """Leaves, treedef and per-leaf targets (checked to be NamedShardings on a plan-cache miss only)."""
  leaves, treedef = jax.tree.flatten(tree)
  if isinstance(target_shardings, NamedSharding):
    return leaves, treedef, [target_shardings] * len(leaves)
  return leaves, treedef, treedef.flatten_up_to(target_shardings)


def _check_targets(targets):
  for t in targets:
    if not isinstance(t, NamedSharding):
      raise TypeError(f"reallocate: target shardings must be NamedSharding, got {type(t).__name__}")


try:  # The checked-once fast constructor of arrays from per-device buffers (see `_Assembler`).
  from jax._src import core as _core
  from jax._src.array import ArrayImpl as _ArrayImpl
except ImportError:  # pragma: no cover - another jax layout: the public API only.
  _core = _ArrayImpl = None


class _Assembler:
  """`jax.make_array_from_single_device_arrays` for one fixed (shape, dtype, sharding), made cheaper
  on repeated calls: the first call goes through the public API, and when its result holds exactly
  the given buffers in the given order (the public API reorders them by device where needed), later
  calls build the array directly with that call's aval and the per-call checks skipped (~6 us
  instead of ~26 us per array on CPU)."""

  __slots__ = ("shape", "sharding", "dtype", "aval", "fast")

  def __init__(self, shape, sharding, dtype):
    self.shape, self.sharding, self.dtype = tuple(shape), sharding, dtype
    self.aval, self.fast = None, False

  def __call__(self, arrays: list):
    if self.fast:
      return _ArrayImpl(self.aval, self.sharding, arrays, committed=True, _skip_checks=True)
    y = jax.make_array_from_single_device_arrays(self.shape, self.sharding, arrays, dtype=self.dtype)
    if _ArrayImpl is not None and arrays and type(y) is _ArrayImpl:
      got = getattr(y, "_arrays", None)
      try:
        same = got is not None and len(got) == len(arrays) and all(
            a.unsafe_buffer_pointer() == b.unsafe_buffer_pointer() for a, b in zip(got, arrays))
      except Exception:  # noqa: BLE001 - a backend without buffer pointers: stay on the public API.
        same = False
      if same:
        self.aval, self.fast = y.aval, True
    return y


def _spec(x, target: NamedSharding) -> LeafSpec:
  if not isinstance(x, jax.Array) or not isinstance(x.sharding, NamedSharding):
    raise TypeError(f"reallocate: leaves must be jax.Arrays with a NamedSharding, got "
                    f"{type(x).__name__} with {getattr(x, 'sharding', None)}")
  return LeafSpec(tuple(x.shape), np.dtype(x.dtype).name, x.sharding, target)


def _plan(x, target: NamedSharding, hw, mode="auto", direct: bool = DEFAULT_DIRECT) -> LeafPlan:
  s = _spec(x, target)
  return plan_leaf(s.shape, np.dtype(s.dtype).itemsize, s.src, s.dst, hw, mode, direct)


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
    self.holds_intermediates = bp.holds_intermediates
    self.same = []    # (leaf indices, jitted identity)
    for devs, ks in bp.same:
      if any(d.process_index == me for d in devs):
        self.same.append((ks, _identity_fn(tuple(specs[k].dst for k in ks), False)))
    self.reshard = []
    for devs, ks in bp.reshard:
      if any(d.process_index == me for d in devs):
        self.reshard.append((ks, _identity_fn(tuple(bp.leaf_plans[k].inter for k in ks), False)))
    self.keep = [k for k in bp.leaves if bp.kinds[k] == "keep"]
    self.empty = [k for k in bp.leaves if bp.kinds[k] == "empty"]
    self.passthrough = [k for k in bp.leaves if bp.kinds[k] == "passthrough"]
    moved = [k for k in bp.leaves if bp.kinds[k] in ("general", "passthrough")]
    # Where each moved leaf's data is cut from: its intermediate (or source) layout.
    view = {k: (bp.leaf_plans[k].inter or specs[k].src) for k in moved}
    self.view_order = {k: _local_order(view[k], me) for k in moved}
    self.has_local = [k for k in moved if self.view_order[k]]
    self.checked = False
    # Pack: per source device of this process, every packed class buffer it fills (its own included).
    # A direct class's buffer is a whole shard of the view: (class, target position, leaf, local position).
    packs: dict = {}  # source device -> [(class, target position)]
    self.direct = []
    for ci, cl in enumerate(bp.classes):
      for j, src in enumerate(cl.srcs):
        if src.process_index != me:
          continue
        if cl.shape is not None:
          (k, _), = cl.cells
          self.direct.append((ci, j, k, self.view_order[k][src]))
        else:
          packs.setdefault(src, []).append((ci, j))
    self.packs = []  # (source device, [(leaf, local position)], [(class, target position)], jitted fn)
    for src, outs in packs.items():
      inputs = sorted({k for ci, _ in outs for k, _ in bp.classes[ci].cells})
      slot = {k: i for i, k in enumerate(inputs)}
      recipe = tuple(tuple((slot[k], bp.cells[k].sources[j][c][1]) for k, c in bp.classes[ci].cells)
                     for ci, j in outs)
      self.packs.append((src, [(k, self.view_order[k][src]) for k in inputs], outs, _pack_fn(recipe)))
    # Copies between devices, in the global order (every process walks the same list).
    self.puts = []  # (class, target position, source device, target device, source mine, target mine)
    for ci, j in bp.transfers:
      cl = bp.classes[ci]
      src, dst = cl.srcs[j], cl.mesh.devices.flat[j]
      if src.process_index == me or dst.process_index == me:
        self.puts.append((ci, j, src, dst, src.process_index == me, dst.process_index == me))
    # Inside this process: one batched device_put per round of copies (`_realloc_plan._transfer_slots`:
    # a GPU sends its copies in the order they are issued), keys and target shardings made once.
    self.local_rounds = []  # ([(class, target position)], [target sharding])
    for rnd in bp.rounds:  # Empty when nothing changes device.
      keys, dsts = [], []
      for ci, j in rnd:
        src, dst = bp.classes[ci].srcs[j], bp.classes[ci].mesh.devices.flat[j]
        if src.process_index == dst.process_index == me:
          keys.append((ci, j))
          dsts.append(SingleDeviceSharding(dst))
      if keys:
        self.local_rounds.append((keys, dsts))
    # Per class with devices here: the global array of its buffers on the target mesh (flat buffers,
    # or a direct class's shards stacked along their first dimension).
    self.arrays = []  # (class, [(class, target position) of this process], assembler)
    for ci, cl in enumerate(bp.classes):
      mine = [j for j, d in enumerate(cl.mesh.devices.flat) if d.process_index == me]
      if mine:
        sharding = NamedSharding(cl.mesh, P(tuple(cl.mesh.axis_names)))
        shape = _class_shape(cl)
        self.arrays.append((ci, [(ci, j) for j in mine],
                            _Assembler((shape[0] * cl.mesh.size, *shape[1:]), sharding, cl.dtype)))
    # Unpack: per target mesh with devices here, ONE program whose outputs are the target arrays.
    by_mesh: dict = {}
    for k in bp.leaves:
      if bp.kinds[k] == "general" and any(d.process_index == me for d in specs[k].dst.mesh.devices.flat):
        by_mesh.setdefault(specs[k].dst.mesh, []).append(k)
    where = {}  # (leaf, cell) -> (class, start, stop); start None: the whole (direct) buffer
    for ci, cl in enumerate(bp.classes):
      if cl.shape is not None:
        where[cl.cells[0]] = (ci, None, None)
        continue
      off = 0
      for k, c in cl.cells:
        n = math.prod(bp.cells[k].cells[c][1])
        where[k, c] = (ci, off, off + n)
        off += n
    self.unpacks = []  # (class indices, leaves, jitted fn)
    for mesh, ks in by_mesh.items():
      inputs = sorted({where[k, c][0] for k in ks for c in range(len(bp.cells[k].cells))})
      slot = {ci: i for i, ci in enumerate(inputs)}
      recipe = []
      for k in ks:
        lc = bp.cells[k]
        parts = tuple((slot[where[k, c][0]],) + where[k, c][1:] + (shape,) for c, (_, shape) in enumerate(lc.cells))
        recipe.append((lc.grid, parts))
      self.unpacks.append((inputs, ks, _unpack_fn(mesh, len(inputs), tuple(recipe),
                                                 tuple(specs[k].dst for k in ks))))
    # Pass-through results: per leaf, the local positions of the target's addressable devices' own
    # intermediate buffers, and the array's assembler.
    self.pass_arrays = []  # (leaf, [local positions], assembler)
    for k in self.passthrough:
      order = self.view_order[k]
      pos = [order[d] for d in specs[k].dst.mesh.devices.flat if d.process_index == me]
      self.pass_arrays.append((k, pos, _Assembler(specs[k].shape, specs[k].dst, specs[k].dtype)))
    # Targets wholly on other processes: this process holds no shard of the result.
    self.elsewhere = [k for k in bp.leaves if bp.kinds[k] in ("same", "general")
                      and not any(d.process_index == me for d in specs[k].dst.mesh.devices.flat)]

  def send(self, leaves, out):
    """First half: same-device and intermediate reshards, packs, copies (all dispatched, none
    waited for). Returns what `recv` needs."""
    bp = self.bp
    for ks, fn in self.same:
      for k, y in zip(ks, fn(*(leaves[k] for k in ks))):
        out[k] = y
    view = {}
    for ks, fn in self.reshard:
      for k, y in zip(ks, fn(*(leaves[k] for k in ks))):
        view[k] = y
    local = {k: _local_arrays(view.get(k, leaves[k])) for k in self.has_local}
    if not self.checked:  # Once per program: the assumed shard order is the real one.
      for k in self.has_local:
        v = view.get(k, leaves[k])
        devs = [sh.device for sh in v.addressable_shards]
        assert devs == sorted(self.view_order[k], key=self.view_order[k].get), (devs, self.view_order[k])
      self.checked = True
    bufs = {}  # (class, target position) -> buffer on the target device (or, before the copy, its source)
    for _, inputs, outs, fn in self.packs:
      for key, b in zip(outs, fn(*(local[k][i] for k, i in inputs))):
        bufs[key] = b
    for ci, j, k, i in self.direct:  # A whole shard moves (or is read in place) as it is.
      bufs[ci, j] = local[k][i]
    for keys, dsts in self.local_rounds:  # Inside this process: one batched call per round.
      ys = jax.device_put([bufs[key] for key in keys], dsts)
      bufs.update(zip(keys, ys))
    for ci, j, src, dst, smine, dmine in self.puts:
      # Across processes: one call per buffer, in the global order. A batched call groups its
      # arrays by (source, destination) devices in an order that differs between processes, so
      # the buffers would pair up wrongly (wrong values, then a hang on a size mismatch).
      if src.process_index == dst.process_index:
        continue
      cl = bp.classes[ci]
      if smine:
        x = bufs[ci, j]
      else:  # Lives on another process: an empty placeholder on its device.
        x = jax.make_array_from_single_device_arrays(_class_shape(cl), SingleDeviceSharding(src), [], dtype=cl.dtype)
      y = jax.device_put(x, SingleDeviceSharding(dst))
      if dmine:
        bufs[ci, j] = y
    return local, bufs

  def recv(self, state, leaves, targets, out, donate):
    """Second half: the class arrays, one unpack program per target mesh, pass-through results,
    donation."""
    bp = self.bp
    local, bufs = state
    arrays = {ci: make([bufs[key] for key in keys]) for ci, keys, make in self.arrays}
    for inputs, ks, fn in self.unpacks:
      for k, y in zip(ks, fn(*(arrays[ci] for ci in inputs))):
        out[k] = y
    for k, pos, make in self.pass_arrays:
      views = local[k]
      out[k] = make([views[i] for i in pos])
    for k in self.elsewhere:
      x = leaves[k]
      out[k] = jax.make_array_from_single_device_arrays(x.shape, targets[k], [], dtype=x.dtype)
    for k in self.keep:
      out[k] = leaves[k]
    for k in self.empty:
      x = leaves[k]
      out[k] = _empty_fn(tuple(x.shape), x.dtype, targets[k])()
    if donate:
      aliased = {id(leaves[k]) for k in self.passthrough if bp.leaf_plans[k].inter is None}
      aliased |= {id(leaves[k]) for k in self.keep}
      seen = set()
      for k in bp.leaves:
        x = leaves[k]
        if id(x) in aliased or id(x) in seen or x.is_deleted():
          continue
        seen.add(id(x))
        x.delete()
    return [out[k] for k in bp.leaves]


def _class_shape(cl) -> tuple[int, ...]:
  """The shape of one target device's buffer of a cell class: flat, or a direct class's shard shape."""
  return (cl.size,) if cl.shape is None else cl.shape


@functools.lru_cache(maxsize=None)
def _pack_fn(recipe):
  """recipe: per output buffer, ((input slot, box or None), ...): the cut cells, flattened and concatenated."""
  def f(*xs):
    outs = []
    for parts in recipe:
      flat = [_cut(xs[j], box).reshape(-1) for j, box in parts]
      outs.append(flat[0] if len(flat) == 1 else jnp.concatenate(flat))
    return tuple(outs)
  return jax.jit(f)


def _assemble(blocks, grid, axis=0):
  """Row-major blocks of a grid (cells per dimension, from `axis` on) concatenated into one array."""
  if not grid:
    return blocks[0]
  step = len(blocks) // grid[0]
  rows = [_assemble(blocks[i * step:(i + 1) * step], grid[1:], axis + 1) for i in range(grid[0])]
  return rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=axis)


@functools.lru_cache(maxsize=None)
def _unpack_fn(mesh, n_inputs: int, recipe, out_shardings):
  """One SPMD program on the target mesh: its inputs are the class arrays (one flat buffer per device),
  its outputs every target array of the bucket. recipe: per output (grid, cells), a cell being
  (input slot, start, stop, shape) in the device's buffer, start None for a whole (direct) buffer;
  the same on every device."""
  axes = P(tuple(mesh.axis_names))

  def body(*bufs):
    outs = []
    for grid, parts in recipe:
      blocks = [bufs[j] if a is None else bufs[j][a:b].reshape(shape) for j, a, b, shape in parts]
      outs.append(_assemble(blocks, grid))
    return tuple(outs)

  f = jax.shard_map(body, mesh=mesh, in_specs=(axes,) * n_inputs,
                    out_specs=tuple(s.spec for s in out_shardings), check_vma=False)
  return jax.jit(f, out_shardings=out_shardings)


@functools.lru_cache(maxsize=64)
def _programs(specs: tuple[LeafSpec, ...], hw, mode: str, bucket_bytes, me: int, schedule: str = DEFAULT_SCHEDULE,
              direct: bool = DEFAULT_DIRECT):
  """(bucket programs, the schedule to run them with: `schedule`, or the plan's choice for "auto")."""
  tp = plan_tree(specs, hw, mode, bucket_bytes, schedule, direct)
  return [_BucketProgram(specs, bp, me) for bp in tp.buckets], tp.schedule


_CALLS: dict = {}  # (leaf shapes, dtypes and shardings, targets, options) -> (bucket programs, schedule)
_MAX_CALLS = 64


def _cached_programs(leaves, targets, hw, mode, bucket_bytes, schedule=DEFAULT_SCHEDULE, direct=DEFAULT_DIRECT):
  """The bucket programs for this call and their schedule, found by one dict lookup when the same
  tree moved before."""
  try:
    key = (tuple([x.aval for x in leaves]), tuple([x.sharding for x in leaves]), tuple(targets), hw, mode,
           bucket_bytes, schedule, direct, jax.process_index())
  except (AttributeError, TypeError):  # Not a jax.Array (_spec names it), or an unhashable target.
    key = None
  progs = _CALLS.get(key) if key is not None else None
  if progs is None:
    _check_targets(targets)
    specs = tuple(_spec(x, t) for x, t in zip(leaves, targets))
    progs = _programs(specs, hw, mode, bucket_bytes, jax.process_index(), schedule, direct)
    if len(_CALLS) >= _MAX_CALLS:
      _CALLS.pop(next(iter(_CALLS)))
    _CALLS[key] = progs
  return progs


def reallocate(tree: Any, target_shardings: Any, *, donate: bool = False,
               bucket_bytes: int | None = DEFAULT_BUCKET_BYTES, hardware: _hw.Hardware | None = None,
               mode: str = "auto", schedule: str = DEFAULT_SCHEDULE, direct: bool = DEFAULT_DIRECT) -> Any:
  """Moves every array of `tree` to its target NamedSharding, device to device.

  Args:
    tree: a pytree of `jax.Array`s with NamedShardings (empty subtrees are fine).
    target_shardings: a matching pytree of NamedSharding (or a tree prefix of it, or one
      NamedSharding for every leaf).
    donate: delete the source arrays once their data is on its way (see module docstring).
    bucket_bytes: peak-memory bound: leaves move in buckets of at most this many bytes, with at
      most two buckets' intermediates alive. None: no bound, no waiting.
    hardware: the profile the planner prices candidate plans with (default: the machine's, `hardware.local_default()`).
    mode: "auto" (same-device fast path, else the cheapest plan), or force "reshard" or "pieces"
      plans for every leaf (see module docstring).
    schedule: "serial" (each bucket sent and unpacked before the next is sent), "pipelined"
      (bucket b sent before bucket b-1 is unpacked) or "auto" (the one `realloc_cost` predicts
      faster for this tree); see the module docstring.
    direct: True moves whole intermediate (or source) shards without a pack; False (the default,
      `DEFAULT_DIRECT`: faster on the 2x H200 run) packs every cell.

  Returns:
    A pytree like `tree` whose leaves have exactly the target shardings and bitwise the same values.
  """
  if schedule not in PLAN_SCHEDULES:
    raise ValueError(f"schedule must be one of {PLAN_SCHEDULES}, got {schedule!r}")
  hw = hardware or _hw.local_default()
  leaves, treedef, targets = _targets_like(tree, target_shardings)
  progs, schedule = _cached_programs(leaves, targets, hw, mode, bucket_bytes, schedule, direct)
  pipelined = schedule == "pipelined"
  out: list = [None] * len(leaves)
  inflight: list[list] = []  # Results of the buckets with intermediates, not yet waited for.
  pending = None  # (program, state): the previous bucket, sent but not yet received.
  for prog in progs:
    if bucket_bytes is not None and prog.holds_intermediates and len(inflight) >= (1 if pipelined else 2):
      _wait(inflight.pop(0))  # Bucket b-2 done: at most b-1 and b alive.
    # Software pipeline: this bucket's packs and transfers are dispatched BEFORE the previous
    # bucket's unpacks. A copy's destination buffer is allocated in its device's compute-stream
    # order, so a copy dispatched after an unpack on its destination waits for that unpack (which
    # waits for its own copies): with send(b+1) queued after recv(b), the copies of b+1 could not
    # start before the copies of b had finished and been unpacked.
    state = prog.send(leaves, out)
    if not pipelined:  # Serial: send(b), recv(b), waiting for bucket b-2.
      done = prog.recv(state, leaves, targets, out, donate)
      if prog.holds_intermediates:
        inflight.append(done)
      continue
    if pending is not None:
      done = pending[0].recv(pending[1], leaves, targets, out, donate)
      if pending[0].holds_intermediates:
        inflight.append(done)
    pending = (prog, state)
  if pending is not None:
    pending[0].recv(pending[1], leaves, targets, out, donate)
  return jax.tree.unflatten(treedef, out)


def _per_leaf(shardings, treedef, n):
  if isinstance(shardings, NamedSharding):
    return [shardings] * n
  return treedef.flatten_up_to(shardings)


def realloc_cost(src_shardings: Any, dst_shardings: Any, tree_shapes: Any,
                 hardware: _hw.Hardware | None = None, mode: str = "auto",
                 bucket_bytes: int | None = DEFAULT_BUCKET_BYTES, schedule: str = DEFAULT_SCHEDULE,
                 direct: bool = DEFAULT_DIRECT) -> float:
  """Predicted seconds for `reallocate` to move `tree_shapes` from `src_shardings` to `dst_shardings`.

  `tree_shapes` is a pytree of anything with `.shape` and `.dtype` (e.g. `jax.ShapeDtypeStruct`);
  the sharding trees match it (or are prefixes of it, or single NamedShardings). It prices the path
  `reallocate` executes with the same arguments by simulating it (`sharding/_realloc_cost.py`): the
  host dispatches each bucket's programs and copies (the call's fixed time `call_s`, `dispatch_s`
  per program, per-array and per-collective host costs, `transfer_latency_s` per copied buffer,
  one Python-made array per cell class and pass-through leaf) and waits where the bucket bound
  makes it wait; each device's compute stream runs the reshards (bytes received per device over
  the collective bandwidth, a latency per collective, XLA's layout copies over HBM), the packs and
  the unpacks (their bytes read and written over HBM) in dispatch order; copies run on the links
  once their sources are packed, after what was dispatched before on their destination devices.
  The result is the time until every output is ready; `schedule="auto"` the faster schedule's.
  The constants and their sources are in `sharding/hardware.py`.
  """
  hw = hardware or _hw.local_default()
  leaves, treedef = jax.tree.flatten(tree_shapes)
  specs = tuple(LeafSpec(tuple(x.shape), np.dtype(x.dtype).name, s, d)
                for x, s, d in zip(leaves, _per_leaf(src_shardings, treedef, len(leaves)),
                                   _per_leaf(dst_shardings, treedef, len(leaves))))
  return plan_tree(specs, hw, mode, bucket_bytes, schedule, direct).seconds


def plans(tree: Any, target_shardings: Any, hardware: _hw.Hardware | None = None,
          mode: str = "auto", direct: bool = DEFAULT_DIRECT) -> Sequence[LeafPlan]:
  """The per-leaf plans of the general path as `reallocate` with the same arguments makes them (for
  inspection, tests and benchmarks; leaves on the same-device fast path get one too, priced as if
  they took the general path)."""
  hw = hardware or _hw.local_default()
  leaves, _, targets = _targets_like(tree, target_shardings)
  _check_targets(targets)
  return [_plan(x, t, hw, mode, direct) for x, t in zip(leaves, targets)]

"""Planning half of `sharding.realloc`: which intermediate layout, which copies, what they cost.

Pure functions of (shape, itemsize, source sharding, target sharding, hardware); no arrays are
touched, so `realloc_cost` and the search can call them on abstract shapes. See the algorithm in
`sharding/realloc.py`'s module docstring. Each bucket's plan carries a hardware-free `BucketLoad`;
`sharding/_realloc_cost.py` turns loads into seconds (per bucket, and simulated for a whole call).

A *region* is a tuple of (start, stop) per array dimension: the box of the global array one
device holds under a sharding.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sharding._realloc_cost import SCHEDULES, BucketLoad, link_seconds, price, timeline, tree_seconds
from sharding.hardware import Hardware
from sharding.mesh import AXES, mesh_over_devices

__all__ = ["SCHEDULES", "BucketLoad", "LeafSpec", "link_seconds", "plan_leaf", "plan_tree", "price", "timeline",
           "tree_seconds"]

Region = tuple[tuple[int, int], ...]


def regions(sharding: NamedSharding, shape: tuple[int, ...]) -> dict[jax.Device, Region]:
  """Device -> the region it holds, for every device of `sharding` (addressable or not)."""
  out = {}
  for d, idx in sharding.devices_indices_map(shape).items():
    out[d] = tuple((s.start or 0, n if s.stop is None else s.stop) for s, n in zip(idx, shape))
  return out


def _size(r: Region) -> int:
  return math.prod(b - a for a, b in r)


def _contains(outer: Region, inner: Region) -> bool:
  return all(a <= c and d <= b for (a, b), (c, d) in zip(outer, inner))


def _overlap(r1: Region, r2: Region) -> int:
  return math.prod(max(0, min(b, d) - max(a, c)) for (a, b), (c, d) in zip(r1, r2))


@dataclasses.dataclass(frozen=True)
class Piece:
  """One box of one target shard: cut from `src`'s intermediate shard, copied to `dst`.

  `local` is the (start, stop) box inside the source device's intermediate shard, or None when the
  piece is that whole shard. `offset` is where the piece starts inside the target shard; `whole`
  says the piece is the entire target shard (no assembly). `src == dst` means no copy.
  """

  dst: jax.Device
  src: jax.Device
  local: Region | None
  offset: tuple[int, ...]
  shape: tuple[int, ...]
  whole: bool


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """How one array moves. `inter` None: no reshard, pieces come from the source layout."""

  inter: NamedSharding | None
  pieces: tuple[Piece, ...]  # Grouped by target device, in the target's device order.
  identical: bool            # Target regions equal source regions device by device: nothing moves.
  reshard_bytes: int         # Max bytes one source device receives in the reshard.
  copy_bytes: int            # Total bytes over device-to-device links.
  seconds: float             # Predicted time under the hardware profile.
  stages: tuple[float, float, float, float]  # reshard, pack, copy, unpack seconds.


def _grid(rs: dict[jax.Device, Region], ndim: int) -> tuple[int, ...]:
  return tuple(len({r[i] for r in rs.values()}) for i in range(ndim))


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def _candidates(shape: tuple[int, ...], src_devices: tuple[jax.Device, ...], tgrid: tuple[int, ...]):
  """Intermediate NamedShardings over the source devices (in source order) whose shards are unions
  of target shards: per-dimension counts g_i dividing the target's, prod(g) dividing the device
  count, at most three mesh axes (grid dims + one replication axis)."""
  n = len(src_devices)
  out = []
  for g in itertools.product(*(_divisors(t) for t in tgrid)):
    u = math.prod(g)
    if n % u:
      continue
    rho = n // u
    factors = [(i, gi) for i, gi in enumerate(g) if gi > 1] + ([(None, rho)] if rho > 1 else [])
    if len(factors) > len(AXES):
      continue
    for perm in set(itertools.permutations(factors)):
      mesh_shape = tuple(f for _, f in perm) + (1,) * (len(AXES) - len(perm))
      spec = [None] * len(shape)
      for ax, (dim, _) in zip(AXES, perm):
        if dim is not None:
          spec[dim] = ax
      out.append(NamedSharding(mesh_over_devices(src_devices, mesh_shape), PartitionSpec(*spec)))
  return out


def _process(d: jax.Device) -> int:
  return d.process_index


def _assign(src_rs: dict[jax.Device, Region], tgt_rs: dict[jax.Device, Region], assemble: bool):
  """Pieces for every target device, taken from the least-loaded holder (itself if it holds one),
  or None when `assemble` is False and some target region is not inside a single source region."""
  holders: dict[Region, list[jax.Device]] = {}
  for d, r in src_rs.items():
    holders.setdefault(r, []).append(d)
  load_out: dict[jax.Device, int] = {}
  pieces = []
  for dst, r in tgt_rs.items():
    cells = []
    for sr in holders:
      box = tuple((max(a, c), min(b, d)) for (a, b), (c, d) in zip(sr, r))
      if all(a < b for a, b in box):
        cells.append((sr, box))
    if len(cells) > 1 and not assemble:
      return None
    for sr, box in cells:
      hs = holders[sr]
      src = dst if dst in hs else min(hs, key=lambda s: (load_out.get(s, 0), _process(s) != _process(dst)))
      if src != dst:
        load_out[src] = load_out.get(src, 0) + _size(box)
      local = None if box == sr else tuple((a - c, b - c) for (a, b), (c, _) in zip(box, sr))
      pieces.append(Piece(dst, src, local, tuple(a - c for (a, _), (c, _) in zip(box, r)),
                          tuple(b - a for a, b in box), len(cells) == 1))
  return tuple(pieces)


def is_passthrough(pieces: tuple[Piece, ...]) -> bool:
  """Every target shard is literally its own device's intermediate (or source) shard: no copy at all."""
  return bool(pieces) and all(pc.src == pc.dst and pc.whole and pc.local is None for pc in pieces)


def _path_stages(pieces, itemsize: int, hw: Hardware, direct: bool = True) -> tuple[float, float, float, int]:
  """(pack, copy, unpack) seconds and link bytes of the general path for one leaf's pieces: every piece
  is packed on its source (with `direct`, except a piece that is a whole intermediate or source
  shard: it moves as it is, and on its own device the unpack reads it in place), copied unless it is
  there, unpacked on its target. The per-bucket load (`_plan_bucket`) is exact where this estimate is
  not: a whole piece moves unpacked only when it is whole on every target device."""
  if is_passthrough(pieces):
    return 0.0, 0.0, 0.0, 0
  packed: dict = {}
  built: dict = {}
  pair: dict = {}
  for pc in pieces:
    n = math.prod(pc.shape) * itemsize
    if not (direct and pc.local is None and pc.shape):
      packed[pc.src] = packed.get(pc.src, 0) + n
    built[pc.dst] = built.get(pc.dst, 0) + n
    if pc.src != pc.dst:
      pair[pc.src, pc.dst] = pair.get((pc.src, pc.dst), 0) + n
  pack_s = 2 * max([*packed.values(), 0]) / hw.hbm_bandwidth
  unpack_s = 2 * max(built.values()) / hw.hbm_bandwidth
  return pack_s, link_seconds(pair, hw), unpack_s, sum(pair.values())


def _xla_rematerializes(src_rs, irs, ndim) -> bool:
  """XLA (0.11/0.12, GSPMD) has no efficient path from a sharding to a partially replicated one
  that shards a dimension the source does not (seen on CPU and GPU: fsdp4 -> P(None, 'fsdp') on a
  2x2 mesh compiles to all-gather + dynamic-slice of the whole array)."""
  sg, ig = _grid(src_rs, ndim), _grid(irs, ndim)
  replicated = math.prod(ig) < len(irs)
  return replicated and any(i > 1 and s == 1 for s, i in zip(sg, ig))


def _shard_shape(rs) -> tuple[int, ...]:
  return tuple(b - a for a, b in next(iter(rs.values())))


def reshard_bytes(shape: tuple[int, ...], itemsize: int, src_rs, dst_rs) -> tuple[int, int]:
  """(bytes one device receives at most, HBM bytes read + written per device beyond the collective)
  when XLA reshards `src_rs` -> `dst_rs` (regions on the same device list) in one jitted program.

  What XLA's GPU compiler emits (0.11/0.12), priced per device:
  * nothing received (every target region inside the device's source region): a local slice,
    reading and writing the target shard once;
  * a collective: NCCL writes its output straight, except that XLA:GPU runs all-gather,
    all-to-all and reduce-scatter only along the most major dimension of the layout
    (`gpu_layout_assignment.cc`: `MoveDimToMajor`). The operand is copied into such a layout (read
    and written once more) when a newly split dimension (an all-to-all's chunks) or, for a pure
    all-gather, the gathered one has a dimension of extent > 1 before it in the shard; the result
    is copied back when a gathered dimension has. 2x H100, 7B stacked fsdp2 -> tensor2 (an
    all-to-all of dims 1 and 2 of [L, D, F], 6.74 GB per device, both copies): 21.0 ms = 3.37 GB
    over the link (8.7 ms at 389 GB/s) + 27 GB of copies (10.4 ms at 2.6 TB/s); fsdp2 -> single
    (all-gathers along minor dims): 34.2 ms = 6.74 GB (17.3 ms) + 40 GB of copies (15.5 ms). A
    change of block order only (same counts per dimension) is a collective-permute: no copy;
  * a partially replicated target that shards a dimension the source does not: XLA all-gathers
    the whole array, then slices (`_xla_rematerializes`).
  """
  ndim = len(shape)
  if all(src_rs[d] == r for d, r in dst_rs.items()):
    return 0, 0
  in_shard, out_shard = _shard_shape(src_rs), _shard_shape(dst_rs)
  in_b = max(_size(r) for r in src_rs.values()) * itemsize
  out_b = max(_size(r) for r in dst_rs.values()) * itemsize
  if _xla_rematerializes(src_rs, dst_rs, ndim):
    full = math.prod(shape) * itemsize
    recv = max(full - _size(src_rs[d]) * itemsize for d in dst_rs)
    gathered = [k for k in range(ndim) if in_shard[k] != shape[k]]
    relayout = any(math.prod(shape[:k]) > 1 for k in gathered)
    return recv, (2 * (in_b + full) if relayout else 0) + 2 * out_b
  recv = max(_size(r) - _overlap(r, src_rs[d]) for d, r in dst_rs.items()) * itemsize
  if recv == 0:
    return 0, 2 * out_b
  sg, dg = _grid(src_rs, ndim), _grid(dst_rs, ndim)
  split = [k for k in range(ndim) if dg[k] > sg[k]]
  gathered = [k for k in range(ndim) if dg[k] < sg[k]]
  # The collective's dimension must be major: the operand is copied when a newly split dimension (an
  # all-to-all's chunks), or for a pure all-gather the gathered one, has a dimension of extent > 1
  # before it; the result when a gathered dimension has.
  copy_in = any(math.prod(in_shard[:k]) > 1 for k in (split or gathered))
  copy_out = any(math.prod(out_shard[:k]) > 1 for k in gathered)
  return recv, 2 * (in_b * copy_in + out_b * copy_out)


MODES = ("auto", "reshard", "pieces")


@functools.lru_cache(maxsize=4096)
def plan_leaf(shape: tuple[int, ...], itemsize: int, src: NamedSharding, dst: NamedSharding,
              hw: Hardware, mode: str = "auto", direct: bool = True) -> LeafPlan:
  """The cheapest on-device plan (under `hw`) to move one array from `src` to `dst`.

  mode "reshard": only intermediates whose shards contain whole target shards (no assembly);
  "pieces": no reshard, target shards assembled from pieces of the source shards; "auto": the
  cheapest of both. A plan's seconds: the reshard (bytes received per device over the collective
  bandwidth, one collective's latency, XLA's layout copies: `reshard_bytes`), packing (with
  `direct`, whole shards are not packed), copies and unpacking in HBM, and its host work (one
  assembled array for a pass-through plan, else a few jitted-program arguments).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if math.prod(shape) == 0:  # Nothing to move: reallocate creates the empty array on the target.
    return LeafPlan(None, (), False, 0, 0, 0.0, (0.0, 0.0, 0.0, 0.0))
  src_rs = regions(src, shape)
  tgt_rs = regions(dst, shape)
  src_devices = tuple(src.mesh.devices.flat)
  if all(src_rs.get(d) == r for d, r in tgt_rs.items()):
    pieces = tuple(Piece(d, d, None, (0,) * len(shape), tuple(b - a for a, b in r), True)
                   for d, r in tgt_rs.items())
    return LeafPlan(None, pieces, True, 0, 0, 0.0, (0.0, 0.0, 0.0, 0.0))
  options = []
  if mode in ("auto", "pieces"):
    options.append((None, src_rs, True))
  if mode in ("auto", "reshard"):
    options.append((None, src_rs, False))
    for inter in _candidates(shape, src_devices, _grid(tgt_rs, len(shape))):
      options.append((inter, regions(inter, shape), False))
  best = None
  for inter, irs, assemble in options:
    pieces = _assign(irs, tgt_rs, assemble)
    if pieces is None:
      continue
    pack_s, copy_s, unpack_s, copy_bytes = _path_stages(pieces, itemsize, hw, direct)
    recv, relayout = reshard_bytes(shape, itemsize, src_rs, irs) if inter is not None else (0, 0)
    latency = hw.collective_latency_s + hw.collective_host_s if recv else 0.0
    reshard_s = (recv / hw.intra_mesh_collective_bandwidth + relayout / hw.hbm_bandwidth + latency
                 + 2 * hw.leaf_arg_s if inter is not None else 0.0)
    host_s = hw.leaf_assemble_s if is_passthrough(pieces) else hw.leaf_arg_s * (1 + len({p.src for p in pieces}))
    stages = (reshard_s, pack_s, copy_s, unpack_s)
    seconds = sum(stages) + host_s
    # Ties: prefer finer intermediates (less memory per device).
    key = (seconds, max(_size(r) for r in irs.values()))
    if best is None or key < best[0]:
      best = (key, LeafPlan(inter, pieces, False, recv, copy_bytes, seconds, stages))
  assert best is not None, "the fully replicated intermediate always holds every region"
  return best[1]


# ---- Tree plans: leaves grouped into buckets, each bucket a fixed handful of programs ---------------

def device_list(s: NamedSharding) -> tuple[jax.Device, ...]:
  """The sharding's device assignment (a jitted program needs the same list, in order, for all arrays)."""
  return tuple(s.mesh.devices.flat)


@dataclasses.dataclass(frozen=True)
class LeafSpec:
  shape: tuple[int, ...]
  dtype: str
  src: NamedSharding
  dst: NamedSharding

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * np.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class LeafCells:
  """A general leaf's target shard cut into a grid of cells, the same grid on every target device.

  The grid refines every target device's pieces (the union of their cut points per dimension), so
  each cell lies inside one piece on every device. `grid`: cells per dimension; `cells`: (offset,
  shape) of each cell inside the target shard, row-major; `sources[j][c]`: for the j-th device of
  the target mesh, the device that holds cell c and the cell's box in that device's intermediate
  (or source) shard, None when the cell is that whole shard.
  """

  grid: tuple[int, ...]
  cells: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
  sources: tuple[tuple[tuple[jax.Device, Region | None], ...], ...]


def leaf_cells(p: LeafPlan, spec: LeafSpec) -> LeafCells:
  shard = spec.dst.shard_shape(spec.shape)
  view = (p.inter or spec.src).shard_shape(spec.shape)
  cuts = []
  for i, n in enumerate(shard):
    points = {0, n} | {pc.offset[i] for pc in p.pieces} | {pc.offset[i] + pc.shape[i] for pc in p.pieces}
    cuts.append(sorted(points))
  intervals = [list(zip(c[:-1], c[1:])) for c in cuts]
  cells = tuple((tuple(a for a, _ in iv), tuple(b - a for a, b in iv)) for iv in itertools.product(*intervals))
  by_dst: dict = {}
  for pc in p.pieces:
    by_dst.setdefault(pc.dst, []).append(pc)
  whole = tuple((0, n) for n in view)
  sources = []
  for d in device_list(spec.dst):
    row = []
    for off, shp in cells:
      pc = next(pc for pc in by_dst[d]
                if all(o <= c and c + n <= o + m for o, m, c, n in zip(pc.offset, pc.shape, off, shp)))
      base = tuple(a for a, _ in pc.local) if pc.local is not None else (0,) * len(off)
      box = tuple((b + c - o, b + c - o + n) for b, c, o, n in zip(base, off, pc.offset, shp))
      row.append((pc.src, None if box == whole else box))
    sources.append(tuple(row))
  return LeafCells(tuple(len(iv) for iv in intervals), cells, tuple(sources))


@dataclasses.dataclass(frozen=True)
class CellClass:
  """Cells of one bucket (one target mesh and dtype) that each target device takes from a single
  device: per target device ONE flat buffer, the cells' elements concatenated in `cells` order, so
  the buffers of all target devices have the same layout and form one global array on the target
  mesh. `srcs[j]`: the device that packs the j-th target device's buffer (itself: no copy).

  A *direct* class (`shape` not None) is one cell that is, on every target device, a whole
  intermediate (or source) shard of `shape`: nothing packs it; the shard itself is copied (or, on
  its own device, read in place by the unpack)."""

  mesh: jax.sharding.Mesh
  dtype: str
  srcs: tuple[jax.Device, ...]
  cells: tuple[tuple[int, int], ...]  # (leaf index, cell index)
  size: int                           # elements per target device
  shape: tuple[int, ...] | None = None  # direct: the shard's shape (the buffer is the shard itself)


@dataclasses.dataclass(frozen=True)
class BucketPlan:
  """One bucket's programs. `kinds[k]` per leaf of `leaves`: "keep" (already placed: returned as is),
  "empty" (size 0), "same" (one jitted reshard on the shared device list), "passthrough" (every
  target shard is its own device's intermediate shard: the result is assembled from those buffers)
  or "general" (cells packed, copied and unpacked).

  same: (device list, leaf indices) per jitted reshard over the shared device list.
  reshard: (source device list, leaf indices) per jitted reshard into the leaves' intermediates.
  cells: the general leaves' cell grids; classes: their cells grouped into one buffer per target
  device; transfers: (class, target position) of every buffer that crosses devices, in the global
  order every process uses (round by round).
  """

  leaves: tuple[int, ...]
  kinds: dict[int, str]
  leaf_plans: dict[int, LeafPlan]
  same: tuple[tuple[tuple[jax.Device, ...], tuple[int, ...]], ...]
  reshard: tuple[tuple[tuple[jax.Device, ...], tuple[int, ...]], ...]
  cells: dict[int, LeafCells]
  classes: tuple[CellClass, ...]
  transfers: tuple[tuple[int, int], ...]
  load: BucketLoad
  host_s: float      # predicted host time: dispatches, transfers, arrays
  device_s: float    # predicted device time, stages added: collectives, pack/unpack, copies over the busiest link
  copy_s: float = 0.0  # the part of device_s spent on the links
  rounds: tuple = ()   # `transfers` split by issue round (`_transfer_slots`): one batched device_put each

  @property
  def holds_intermediates(self) -> bool:
    return self.load.holds_intermediates


@dataclasses.dataclass(frozen=True)
class TreePlan:
  buckets: tuple[BucketPlan, ...]
  seconds: float
  schedule: str = "serial"  # the schedule `seconds` is priced for (the chosen one when asked for "auto")
  host_s: float = 0.0       # predicted time until `reallocate` returns


def bucket_indices(specs, bucket_bytes):
  if bucket_bytes is None:
    return [list(range(len(specs)))]
  out, cur, size = [], [], 0
  for i, s in enumerate(specs):
    n = s.nbytes
    if cur and size + n > bucket_bytes:
      out.append(cur)
      cur, size = [], 0
    cur.append(i)
    size += n
  if cur:
    out.append(cur)
  return out


def _classes(specs, cells: dict[int, LeafCells], direct: bool) -> tuple[CellClass, ...]:
  """Cells grouped by (target mesh, dtype, source of every target device), in leaf and cell order;
  with `direct`, a cell that is a whole intermediate shard on every target device is a class of its
  own (after the packed ones)."""
  groups: dict = {}
  alone = []
  for k, lc in cells.items():
    s = specs[k]
    for c, (_, shape) in enumerate(lc.cells):
      srcs = tuple(row[c][0] for row in lc.sources)
      if direct and shape and all(row[c][1] is None for row in lc.sources):
        alone.append(CellClass(s.dst.mesh, s.dtype, srcs, ((k, c),), math.prod(shape), tuple(shape)))
        continue
      groups.setdefault((s.dst.mesh, s.dtype, srcs), []).append((k, c, math.prod(shape)))
  return tuple(CellClass(mesh, dtype, srcs, tuple((k, c) for k, c, _ in v), sum(n for *_, n in v))
               for (mesh, dtype, srcs), v in groups.items()) + tuple(alone)


def _plan_bucket(specs, idx, hw: Hardware, mode: str, direct: bool) -> BucketPlan:
  kinds, leaf_plans, cells = {}, {}, {}
  same: dict = {}
  reshard: dict = {}
  recv_same = 0      # bytes received per device by the reshards (summed over leaves)
  relayout = 0       # HBM bytes of XLA's layout copies and slices per device (summed over leaves)
  n_collectives = 0
  n_passthrough = 0
  for k in idx:
    s = specs[k]
    itemsize = np.dtype(s.dtype).itemsize
    if s.src == s.dst:
      kinds[k] = "keep"
    elif math.prod(s.shape) == 0:
      kinds[k] = "empty"
    elif mode == "auto" and device_list(s.src) == device_list(s.dst):
      kinds[k] = "same"
      same.setdefault(device_list(s.src), []).append(k)
      recv, hbm = reshard_bytes(s.shape, itemsize, regions(s.src, s.shape), regions(s.dst, s.shape))
      recv_same += recv
      relayout += hbm
      n_collectives += recv > 0
    else:
      p = plan_leaf(s.shape, itemsize, s.src, s.dst, hw, mode, direct)
      leaf_plans[k] = p
      if p.inter is not None:
        reshard.setdefault(device_list(p.inter), []).append(k)
        recv, hbm = reshard_bytes(s.shape, itemsize, regions(s.src, s.shape), regions(p.inter, s.shape))
        recv_same += recv
        relayout += hbm
        n_collectives += recv > 0
      if is_passthrough(p.pieces):
        kinds[k] = "passthrough"
        n_passthrough += 1
      else:
        kinds[k] = "general"
        cells[k] = leaf_cells(p, s)
  classes = _classes(specs, cells, direct)
  transfers = []
  packed: dict = {}   # source device -> bytes it packs
  pack_in = set()     # (source device, leaf): the packs' inputs
  pairs: dict = {}    # (source, target) -> bytes copied
  outputs = 0         # buffers the packs write
  for ci, cl in enumerate(classes):
    nbytes = cl.size * np.dtype(cl.dtype).itemsize
    for j, (src, dst) in enumerate(zip(cl.srcs, cl.mesh.devices.flat)):
      if cl.shape is None:
        packed[src] = packed.get(src, 0) + nbytes
        pack_in |= {(src, k) for k, _ in cl.cells}
        outputs += 1
      if src != dst:
        pairs[src, dst] = pairs.get((src, dst), 0) + nbytes
        transfers.append((ci, j))
  slots = _transfer_slots(classes, transfers)
  transfers.sort(key=lambda t: (slots[t], *_transfer_order(classes, t)))
  rounds = tuple(tuple(t for t in transfers if slots[t] == r) for r in range(max(slots.values(), default=-1) + 1))
  built: dict = {}    # target device -> bytes its unpack writes
  for k in cells:
    nbytes = math.prod(specs[k].dst.shard_shape(specs[k].shape)) * np.dtype(specs[k].dtype).itemsize
    for d in device_list(specs[k].dst):
      built[d] = built.get(d, 0) + nbytes
  coll_devices = tuple(dict.fromkeys(d for devs, _ in (*same.items(), *reshard.items()) for d in devs))
  coll_arrays = 2 * sum(len(ks) for ks in same.values()) + 2 * sum(len(ks) for ks in reshard.values())
  load = BucketLoad(
      collective_bytes=recv_same, collectives=n_collectives, packed=packed, pairs=pairs, built=built,
      programs=(len(same) + len(reshard) + len(packed) + len({specs[k].dst.mesh for k in cells})
                + sum(kinds[k] == "empty" for k in idx)),
      transfers=len(transfers), transfer_calls=len(rounds), assembled_arrays=len(classes) + n_passthrough,
      program_arrays=len(idx) + coll_arrays + len(pack_in) + outputs + len(classes) + len(cells),
      collective_hbm_bytes=relayout, collective_devices=coll_devices, collective_programs=len(same) + len(reshard),
      collective_arrays=coll_arrays, pack_programs=len(packed), pack_arrays=len(pack_in) + outputs,
      holds_intermediates=any(kd in ("general", "passthrough") for kd in kinds.values()))
  host_s, device_s, copy_s = price(load, hw)
  return BucketPlan(tuple(idx), kinds, leaf_plans, tuple((d, tuple(ks)) for d, ks in same.items()),
                    tuple((d, tuple(ks)) for d, ks in reshard.items()), cells, classes, tuple(transfers),
                    load, host_s, device_s, copy_s, rounds)


def _transfer_order(classes, t):
  ci, j = t
  src, dst = classes[ci].srcs[j], classes[ci].mesh.devices.flat[j]
  return (src.process_index, src.id, dst.process_index, dst.id, ci)


def _transfer_slots(classes, transfers) -> dict:
  """The round of each copy: a source device's copies to its k-th destination go in round k, and each
  round is issued as one batched `device_put` after the one before.

  Why: a GPU sends its copies one after another, in the order they are issued (4x H200 trace of 7B
  fsdp4 -> tensor2 on 2 of the 4: every copy out of one GPU waited for the one before, on whichever
  of its P2P streams it ran), while one batched `device_put` issues its (source, destination) groups
  in hash-map order. In one call, GPUs 2 and 3 both sent to GPU 0 first, then both to GPU 1: the
  target GPUs took turns, each receiving from three sources at once (~400 GB/s in) and then from
  one, so a 7B bucket took 4.5 ms instead of the 2.8 ms its busiest inbound link needs. So each
  source's destinations are ordered here, greedily: sources in device order, each taking first the
  destination that has received the fewest bytes in that round so far (ties: device order); every
  copy between the same pair shares a round. A source with one destination puts everything in round 0."""
  by_src: dict = {}
  for t in sorted(transfers, key=lambda t: _transfer_order(classes, t)):
    ci, j = t
    cl = classes[ci]
    src, dst = cl.srcs[j], cl.mesh.devices.flat[j]
    by_src.setdefault(src, {}).setdefault(dst, []).append((t, cl.size * np.dtype(cl.dtype).itemsize))
  load: dict = {}   # (round, destination) -> bytes
  slots: dict = {}
  for src, dsts in by_src.items():  # sorted: the transfers were
    todo = list(dsts)
    for r in range(len(todo)):
      dst = min(todo, key=lambda d: load.get((r, d), 0))  # the first of the least loaded
      todo.remove(dst)
      for t, nbytes in dsts[dst]:
        slots[t] = r
        load[r, dst] = load.get((r, dst), 0) + nbytes
  return slots


PLAN_SCHEDULES = SCHEDULES + ("auto",)


@functools.lru_cache(maxsize=64)
def plan_tree(specs: tuple[LeafSpec, ...], hw: Hardware, mode: str, bucket_bytes: int | None,
              schedule: str = "serial", direct: bool = True) -> TreePlan:
  """Buckets and their programs for a whole tree, priced by `timeline` under `schedule` (0 when
  nothing moves). `schedule="auto"`: the schedule `timeline` predicts faster (serial on a tie).
  `direct=False` packs every cell, whole shards included (the cell-classes implementation before
  direct classes, kept for comparison)."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if schedule not in PLAN_SCHEDULES:
    raise ValueError(f"schedule must be one of {PLAN_SCHEDULES}, got {schedule!r}")
  buckets = tuple(_plan_bucket(specs, idx, hw, mode, direct) for idx in bucket_indices(specs, bucket_bytes))
  if not any(k != "keep" for b in buckets for k in b.kinds.values()):
    return TreePlan(buckets, 0.0, "serial" if schedule == "auto" else schedule, 0.0)
  loads = [b.load for b in buckets]
  waits = bucket_bytes is not None
  priced = {sc: timeline(loads, hw, sc, waits) for sc in (SCHEDULES if schedule == "auto" else (schedule,))}
  best = min(priced, key=lambda sc: (priced[sc][1], sc != "serial"))
  return TreePlan(buckets, priced[best][1], best, priced[best][0])

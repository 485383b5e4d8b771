"""Planning half of `sharding.realloc`: which intermediate layout, which copies, what they cost.

Pure functions of (shape, itemsize, source sharding, target sharding, hardware); no arrays are
touched, so `realloc_cost` and the search can call them on abstract shapes. See the algorithm in
`sharding/realloc.py`'s module docstring.

A *region* is a tuple of (start, stop) per array dimension: the box of the global array one
device holds under a sharding.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
from jax.sharding import NamedSharding, PartitionSpec

from sharding.hardware import Hardware
from sharding.mesh import AXES, mesh_over_devices

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
  stages: tuple[float, float, float, float]  # reshard, slice, copy, assemble seconds.


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


def _assign(src_rs: dict[jax.Device, Region], tgt_rs: dict[jax.Device, Region], itemsize: int,
            hw: Hardware, assemble: bool):
  """Pieces for every target device, taken from the least-loaded holder (itself if it holds one).

  Returns (pieces, (slice_s, copy_s, assemble_s), copy_bytes), or None when `assemble` is False
  and some target region is not inside a single source region.
  """
  holders: dict[Region, list[jax.Device]] = {}
  for d, r in src_rs.items():
    holders.setdefault(r, []).append(d)
  load_out: dict[jax.Device, int] = {}
  load_in: dict[jax.Device, int] = {}
  sliced: dict[jax.Device, int] = {}
  built: dict[jax.Device, int] = {}
  ncopies: dict[jax.Device, int] = {}
  pair: dict[tuple[jax.Device, jax.Device], int] = {}
  pieces = []
  copy_bytes = 0
  cross = False
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
      nbytes = _size(box) * itemsize
      local = None if box == sr else tuple((a - c, b - c) for (a, b), (c, _) in zip(box, sr))
      if local is not None:
        sliced[src] = sliced.get(src, 0) + nbytes
      if src != dst:
        load_out[src] = load_out.get(src, 0) + nbytes
        load_in[dst] = load_in.get(dst, 0) + nbytes
        pair[src, dst] = pair.get((src, dst), 0) + nbytes
        ncopies[src] = ncopies.get(src, 0) + 1
        copy_bytes += nbytes
        cross |= _process(src) != _process(dst)
      whole = len(cells) == 1
      if not whole:
        built[dst] = built.get(dst, 0) + nbytes
      pieces.append(Piece(dst, src, local, tuple(a - c for (a, _), (c, _) in zip(box, r)),
                          tuple(b - a for a, b in box), whole))
  bw = hw.inter_host_bandwidth if cross else hw.d2d_bandwidth
  busiest = max([*load_out.values(), *load_in.values(), 0])
  copy_s = max([*(b / bw for b in pair.values()), busiest / hw.d2d_device_bandwidth])
  copy_s += max(ncopies.values()) * hw.transfer_latency_s if ncopies else 0.0
  slice_s = 2 * max([*sliced.values(), 0]) / hw.hbm_bandwidth
  assemble_s = 2 * max([*built.values(), 0]) / hw.hbm_bandwidth
  return tuple(pieces), (slice_s, copy_s, assemble_s), copy_bytes


def _xla_rematerializes(src_rs, irs, ndim) -> bool:
  """XLA (0.11/0.12, GSPMD) has no efficient path from a sharding to a partially replicated one
  that shards a dimension the source does not (seen on CPU and GPU: fsdp4 -> P(None, 'fsdp') on a
  2x2 mesh compiles to all-gather + dynamic-slice of the whole array)."""
  sg, ig = _grid(src_rs, ndim), _grid(irs, ndim)
  replicated = math.prod(ig) < len(irs)
  return replicated and any(i > 1 and s == 1 for s, i in zip(sg, ig))


MODES = ("auto", "reshard", "pieces")


@functools.lru_cache(maxsize=4096)
def plan_leaf(shape: tuple[int, ...], itemsize: int, src: NamedSharding, dst: NamedSharding,
              hw: Hardware, mode: str = "auto") -> LeafPlan:
  """The cheapest on-device plan (under `hw`) to move one array from `src` to `dst`.

  mode "reshard": only intermediates whose shards contain whole target shards (no assembly);
  "pieces": no reshard, target shards assembled from pieces of the source shards; "auto": the
  cheapest of both.
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
    a = _assign(irs, tgt_rs, itemsize, hw, assemble)
    if a is None:
      continue
    pieces, (slice_s, copy_s, assemble_s), copy_bytes = a
    if inter is None:
      recv = 0
    elif _xla_rematerializes(src_rs, irs, len(shape)):
      # XLA's SPMD partitioner all-gathers the whole array and slices ("Involuntary full
      # rematerialization"): every device receives all it does not hold.
      recv = max(math.prod(shape) - _size(src_rs[d]) for d in irs) * itemsize
    else:
      recv = max(_size(r) - _overlap(r, src_rs[d]) for d, r in irs.items()) * itemsize
    reshard_s = recv / hw.intra_mesh_collective_bandwidth + (hw.transfer_latency_s if inter is not None else 0)
    stages = (reshard_s, slice_s, copy_s, assemble_s)
    seconds = sum(stages)
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


def same_device_recv(shape: tuple[int, ...], itemsize: int, src: NamedSharding, dst: NamedSharding) -> int:
  """Max bytes one device receives when XLA reshards src -> dst on one device list."""
  src_rs, tgt_rs = regions(src, shape), regions(dst, shape)
  return max((_size(r) - _overlap(r, src_rs[d])) * itemsize for d, r in tgt_rs.items())


@dataclasses.dataclass(frozen=True)
class LeafSpec:
  shape: tuple[int, ...]
  dtype: str
  src: NamedSharding
  dst: NamedSharding

  @property
  def nbytes(self) -> int:
    import numpy as np
    return math.prod(self.shape) * np.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class BucketPlan:
  """One bucket's programs. `kinds[k]` per leaf of `leaves`: "keep" (already placed: returned as is),
  "empty" (size 0), "same" (one jitted reshard on the shared device list), "general" (LeafPlan).

  same: (device list, leaf indices) per jitted reshard over the shared device list.
  reshard: (source device list, leaf indices) per jitted reshard into the leaves' intermediates.
  transfers: (src, dst, dtype) -> ((leaf index, piece index), ...): one packed buffer per device
    pair and dtype, concatenating the pieces' elements in this order.
  """

  leaves: tuple[int, ...]
  kinds: dict[int, str]
  leaf_plans: dict[int, LeafPlan]
  same: tuple[tuple[tuple[jax.Device, ...], tuple[int, ...]], ...]
  reshard: tuple[tuple[tuple[jax.Device, ...], tuple[int, ...]], ...]
  transfers: dict[tuple[jax.Device, jax.Device, str], tuple[tuple[int, int], ...]]
  host_s: float      # predicted host time: dispatches, transfers, per-leaf array assembly
  device_s: float    # predicted device time: collectives, pack/unpack, copies over the busiest link
  copy_s: float = 0.0  # the part of device_s spent on the links (overlaps other buckets' compute)


@dataclasses.dataclass(frozen=True)
class TreePlan:
  buckets: tuple[BucketPlan, ...]
  seconds: float


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


def _plan_bucket(specs, idx, hw: Hardware, mode: str) -> BucketPlan:
  import numpy as np
  kinds, leaf_plans = {}, {}
  same: dict = {}
  reshard: dict = {}
  transfers: dict = {}
  recv_same = 0.0
  n_same_leaves = n_reshard_leaves = 0
  n_general = 0
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
      recv_same += same_device_recv(s.shape, itemsize, s.src, s.dst)
      n_same_leaves += 1
    else:
      p = plan_leaf(s.shape, itemsize, s.src, s.dst, hw, mode)
      kinds[k] = "general"
      leaf_plans[k] = p
      n_general += 1
      if p.inter is not None:
        reshard.setdefault(device_list(p.inter), []).append(k)
        recv_same += p.reshard_bytes
        n_reshard_leaves += 1
      for i, pc in enumerate(p.pieces):
        if pc.src != pc.dst:
          transfers.setdefault((pc.src, pc.dst, s.dtype), []).append((k, i))
  # Device time: collectives, then packing, the copies over the busiest link, unpacking.
  packed_out: dict = {}
  packed_in: dict = {}
  pair_s: dict = {}
  for (src, dst, dtype), segs in transfers.items():
    nbytes = sum(math.prod(leaf_plans[k].pieces[i].shape) for k, i in segs) * np.dtype(dtype).itemsize
    packed_out[src] = packed_out.get(src, 0) + nbytes
    packed_in[dst] = packed_in.get(dst, 0) + nbytes
    bw = hw.inter_host_bandwidth if src.process_index != dst.process_index else hw.d2d_bandwidth
    pair_s[src, dst] = pair_s.get((src, dst), 0.0) + nbytes / bw
  unpack = dict(packed_in)
  for k, p in leaf_plans.items():  # Local slices and assembly on the target devices.
    for pc in p.pieces:
      if pc.src == pc.dst and (pc.local is not None or not pc.whole):
        unpack[pc.dst] = unpack.get(pc.dst, 0) + math.prod(pc.shape) * np.dtype(specs[k].dtype).itemsize
  busiest = max([*packed_out.values(), *packed_in.values(), 0])
  copy_s = max([*pair_s.values(), busiest / hw.d2d_device_bandwidth])
  device_s = (recv_same / hw.intra_mesh_collective_bandwidth
              + (n_same_leaves + n_reshard_leaves) * hw.collective_latency_s
              + 2 * max([*packed_out.values(), 0]) / hw.hbm_bandwidth
              + copy_s
              + 2 * max([*unpack.values(), 0]) / hw.hbm_bandwidth)
  n_programs = len(same) + len(reshard) + len(packed_out) + len({d for d in unpack})
  for k in idx:
    if kinds[k] == "empty":
      n_programs += 1
  host_s = (n_programs * hw.dispatch_s + len(transfers) * hw.transfer_latency_s
            + (n_same_leaves + n_reshard_leaves) * hw.leaf_arg_s + n_general * hw.leaf_assemble_s)
  return BucketPlan(tuple(idx), kinds, leaf_plans, tuple((d, tuple(ks)) for d, ks in same.items()),
                    tuple((d, tuple(ks)) for d, ks in reshard.items()),
                    {key: tuple(v) for key, v in sorted(transfers.items(), key=_transfer_order)},
                    host_s, device_s, copy_s)


def _transfer_order(item):
  (src, dst, dtype), _ = item
  return (src.process_index, src.id, dst.process_index, dst.id, dtype)


@functools.lru_cache(maxsize=64)
def plan_tree(specs: tuple[LeafSpec, ...], hw: Hardware, mode: str, bucket_bytes: int | None) -> TreePlan:
  """Buckets and their programs for a whole tree; the prediction is max(host, device) + one dispatch,
  host summed over buckets (host dispatch of one bucket overlaps the device work of the previous
  one), device as the bucket pipeline: max(links, compute) summed over buckets plus one bucket's
  exposed min(copy, compute)."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  buckets = tuple(_plan_bucket(specs, idx, hw, mode) for idx in bucket_indices(specs, bucket_bytes))
  host = sum(b.host_s for b in buckets)
  # Buckets are pipelined (realloc.py): the links carry the buckets' copies back to back while the
  # compute streams pack and unpack the neighbours; one bucket's compute/copy stays exposed.
  links = sum(b.copy_s for b in buckets)
  compute = sum(b.device_s - b.copy_s for b in buckets)
  exposed = max([min(b.copy_s, b.device_s - b.copy_s) for b in buckets], default=0.0)
  device = max(links, compute) + exposed
  moves = any(k != "keep" for b in buckets for k in b.kinds.values())
  seconds = (max(host, device) + hw.dispatch_s) if moves else 0.0
  return TreePlan(buckets, seconds)

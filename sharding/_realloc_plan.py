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
from sharding.mesh import AXES, _build_mesh

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
class Send:
  """One target shard: comes from `src` (a device holding it in the intermediate) to `dst`.

  `local` is the (start, stop) box inside the source device's intermediate shard, or None when the
  piece is that whole shard. `src == dst` means no copy at all.
  """

  dst: jax.Device
  src: jax.Device
  local: Region | None
  shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """How one array moves. `inter` None: the source layout already holds every target region."""

  inter: NamedSharding | None
  sends: tuple[Send, ...]
  identical: bool            # Target regions equal source regions device by device: nothing moves.
  reshard_bytes: int         # Max bytes one source device receives in the reshard.
  copy_bytes: int            # Total bytes over device-to-device links.
  seconds: float             # Predicted time under the hardware profile.


def _grid(rs: dict[jax.Device, Region], ndim: int) -> tuple[int, ...]:
  return tuple(len({r[i] for r in rs.values()}) for i in range(ndim))


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def _candidates(shape: tuple[int, ...], src_devices: tuple[jax.Device, ...], tgrid: tuple[int, ...]):
  """Intermediate NamedShardings over the source devices (in source order) whose shards are unions
  of target shards: per-dimension counts g_i dividing the target's, prod(g) dividing the device
  count, at most three mesh axes (grid dims + one replication axis)."""
  n = len(src_devices)
  ids = tuple(d.id for d in src_devices)
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
      out.append(NamedSharding(_build_mesh(ids, mesh_shape), PartitionSpec(*spec)))
  return out


def _process(d: jax.Device) -> int:
  return d.process_index


def _assign(src_rs: dict[jax.Device, Region], tgt_rs: dict[jax.Device, Region], itemsize: int,
            hw: Hardware):
  """For every target device, a source device holding its region; returns (sends, copy_seconds,
  copy_bytes, slice_seconds) or None if some region is held nowhere."""
  load_out: dict[jax.Device, int] = {}
  load_in: dict[jax.Device, int] = {}
  sends = []
  slice_bytes: dict[jax.Device, int] = {}
  copies: dict[jax.Device, int] = {}
  copy_bytes = 0
  cross = False
  for dst, r in tgt_rs.items():
    holders = [s for s, sr in src_rs.items() if _contains(sr, r)]
    if not holders:
      return None
    if dst in holders:
      src = dst
    else:
      src = min(holders, key=lambda s: (load_out.get(s, 0), _process(s) != _process(dst)))
    sr = src_rs[src]
    nbytes = _size(r) * itemsize
    local = None if sr == r else tuple((a - c, b - c) for (a, b), (c, _) in zip(r, sr))
    if local is not None:
      slice_bytes[src] = slice_bytes.get(src, 0) + nbytes
    if src != dst:
      load_out[src] = load_out.get(src, 0) + nbytes
      load_in[dst] = load_in.get(dst, 0) + nbytes
      copies[src] = copies.get(src, 0) + 1
      copy_bytes += nbytes
      cross |= _process(src) != _process(dst)
    sends.append(Send(dst, src, local, tuple(b - a for a, b in r)))
  bw = hw.inter_host_bandwidth if cross else hw.d2d_bandwidth
  busiest = max([*load_out.values(), *load_in.values(), 0])
  copy_s = busiest / bw + (max(copies.values()) * hw.transfer_latency_s if copies else 0.0)
  slice_s = 2 * max([*slice_bytes.values(), 0]) / hw.hbm_bandwidth
  return tuple(sends), copy_s, copy_bytes, slice_s


@functools.lru_cache(maxsize=4096)
def plan_leaf(shape: tuple[int, ...], itemsize: int, src: NamedSharding, dst: NamedSharding,
              hw: Hardware) -> LeafPlan:
  """The cheapest on-device plan (under `hw`) to move one array from `src` to `dst`."""
  src_rs = regions(src, shape)
  tgt_rs = regions(dst, shape)
  src_devices = tuple(src.mesh.devices.flat)
  if all(src_rs.get(d) == r for d, r in tgt_rs.items()):
    sends = tuple(Send(d, d, None, tuple(b - a for a, b in r)) for d, r in tgt_rs.items())
    return LeafPlan(None, sends, True, 0, 0, 0.0)
  best = None
  # Candidate "no reshard": the source layout itself, when every target region sits inside one.
  options = [(None, src_rs)]
  for inter in _candidates(shape, src_devices, _grid(tgt_rs, len(shape))):
    options.append((inter, regions(inter, shape)))
  for inter, irs in options:
    a = _assign(irs, tgt_rs, itemsize, hw)
    if a is None:
      continue
    sends, copy_s, copy_bytes, slice_s = a
    if inter is None:
      recv = 0
    else:
      recv = max(_size(r) - _overlap(r, src_rs[d]) for d, r in irs.items()) * itemsize
    reshard_s = recv / hw.intra_mesh_collective_bandwidth + (hw.transfer_latency_s if inter is not None else 0)
    seconds = reshard_s + slice_s + copy_s
    # Ties: prefer finer intermediates (less memory per device).
    key = (seconds, max(_size(r) for r in irs.values()))
    if best is None or key < best[0]:
      best = (key, LeafPlan(inter, sends, False, recv, copy_bytes, seconds))
  assert best is not None, "the fully replicated intermediate always holds every region"
  return best[1]

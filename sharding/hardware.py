"""Hardware profile: the link and memory bandwidths that price a reallocation.

`Hardware` is a frozen dataclass with the numbers `sharding.realloc_cost` needs. The search
package stores profiles as JSON (`search/profiles/*.json`) that carry these fields and more;
`Hardware.from_json` keeps every key it does not know in `extra` (a dict, round-tripped by
`to_json`), so one profile file serves both packages.

Bandwidth conventions (all in bytes per second):

* `d2d_bandwidth` - one device-to-device copy inside a host, per device pair (what a plain
  `jax.device_put` of a single-device shard achieves). Copies on disjoint pairs run in parallel.
* `d2d_device_bandwidth` - all copies into (or out of) one device together (several pairs at once).
* `inter_host_bandwidth` - the same for a pair of devices on different hosts (per device).
* `hbm_bandwidth` - on-device memory copy rate (read + write counted once each: a copy of B bytes
  costs 2 B / hbm_bandwidth).
* `intra_mesh_collective_bandwidth` - bytes *received per device* per second by a jitted reshard
  (all-to-all / all-gather) inside one mesh.
* `transfer_latency_s` - host cost of one device-to-device buffer copy inside a batched `device_put`.
* `dispatch_s` - host cost of dispatching one jitted program (reshard, pack, unpack).
* `collective_latency_s` - device cost of one array's collective inside a reshard program (XLA
  emits one collective per array; on GPUs each is a kernel launch and a synchronisation).
* `leaf_arg_s` - host cost per array argument or output of a jitted program (the C++ dispatch
  path), and per leaf of a `reallocate` call (flattening, the plan lookup).
* `leaf_assemble_s` - host cost of one array assembled in Python from per-device buffers
  (`jax.make_array_from_single_device_arrays`): one per cell class of a bucket, and one per
  pass-through leaf.
* `call_s` - fixed host cost of one `reallocate` call, whatever its plan (seen on 4x H100: ~11 ms
  per call until return with nothing waited for, for 1 to 5 programs).

`d2d_device_bandwidth` and the last five have defaults (older profile files lack them; `call_s`
defaults to 0).
`realloc_cost` prices each bucket's host time (dispatches, transfers, arrays) and device time
(collectives, pack and unpack copies in HBM, bytes over the busiest link) and takes the larger of
the host total and the device pipeline: host dispatch of one bucket overlaps the device work of
the previous one.

`H100_SXM` is the default, from measurements on 4x H100 SXM (NVLink) with jax 0.11.2 (DESIGN.md
section 4); `bench/realloc.py --fit` refits it to a benchmark run (see bench/README.md).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass(frozen=True)
class Hardware:
  """Bandwidths and latencies of one accelerator type and its interconnect."""

  name: str
  devices_per_host: int
  d2d_bandwidth: float
  inter_host_bandwidth: float
  hbm_bandwidth: float
  intra_mesh_collective_bandwidth: float
  transfer_latency_s: float
  d2d_device_bandwidth: float = 0.0  # 0: 2 x d2d_bandwidth.
  dispatch_s: float = 40e-6
  collective_latency_s: float = 40e-6
  leaf_arg_s: float = 3e-6
  leaf_assemble_s: float = 30e-6
  call_s: float = 0.0
  extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

  def __post_init__(self):
    if not self.d2d_device_bandwidth:
      object.__setattr__(self, "d2d_device_bandwidth", 2 * self.d2d_bandwidth)
    for f in ("d2d_bandwidth", "d2d_device_bandwidth", "inter_host_bandwidth", "hbm_bandwidth", "intra_mesh_collective_bandwidth"):
      if not getattr(self, f) > 0:
        raise ValueError(f"Hardware.{f} must be > 0, got {getattr(self, f)!r}")
    for f in ("transfer_latency_s", "dispatch_s", "collective_latency_s", "leaf_arg_s", "leaf_assemble_s", "call_s"):
      if getattr(self, f) < 0:
        raise ValueError(f"Hardware {self.name}: {f} must be >= 0, got {getattr(self, f)!r}")
    if self.devices_per_host < 1:
      raise ValueError(f"Hardware {self.name}: devices_per_host must be >= 1")

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> Hardware:
    """Known keys become fields; unknown keys are kept in `extra` (and merged with an `extra` key)."""
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {k: v for k, v in d.items() if k in names}
    extra = dict(d.get("extra", {}))
    extra.update({k: v for k, v in d.items() if k not in names and k != "extra"})
    optional = {f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    missing = names - known.keys() - optional
    if missing:
      raise ValueError(f"hardware profile lacks {sorted(missing)}")
    return cls(**known, extra=extra)

  def to_dict(self) -> dict[str, Any]:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
    d.update(self.extra)
    return d

  @classmethod
  def from_json(cls, text_or_path: str) -> Hardware:
    """From a JSON string, or from a path to a JSON file."""
    text = text_or_path
    if not text_or_path.lstrip().startswith("{"):
      with open(text_or_path) as f:
        text = f.read()
    return cls.from_dict(json.loads(text))

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# 4x H100 SXM 80GB, NVLink 4, one host, jax 0.11.2. Sources, all runs of 2026-11-26:
# * d2d_bandwidth and d2d_device_bandwidth 272 GB/s: the raw copies of the cell-classes run
#   (bench/results/realloc-h100.json, 14:48): 7B tensor2 (2 of 4) -> fsdp4 moved 6.74 GB out of each
#   of its 2 source GPUs in 24.8 ms (272 GB/s), 7B data2 x tensor2 -> fsdp4 the same bytes in 25.2 ms;
#   no record shows one pair faster than its device's total, so the pair rate is the same number.
# * transfer_latency_s 28 us per copied buffer: the same run's latency-bound raw copies, (time - bytes
#   at 272 GB/s) / transfers: 7B fsdp4 -> tensor4 33 us (1164 transfers), 7B fsdp4 -> tensor2 28 us,
#   1B fsdp4 -> tensor4 34 us, 1B fsdp4 -> tensor2 25 us, 1B tensor2 -> fsdp4 15 us; the median.
# * hbm_bandwidth 2.15 TB/s (read + written bytes): a jitted elementwise pass over 2 GiB on one of
#   these H100s (bench/results/calls-h100.json, hbm_bytes_per_s); prices the pack and unpack passes.
# * intra_mesh_collective_bandwidth 225 GB/s received per device and collective_latency_s 40 us per
#   array: the same-device reshards of the per-leaf implementation's run (12:20, 7B fsdp4 -> tensor4,
#   2.5 GB per device, 291 leaves: 21.5 ms measured unbucketed, 22.8 predicted; 1B: 11.7, 10.1).
# * call_s 7.5 ms per call and dispatch_s 366 us per program: non-negative least squares on the
#   cell-classes run's 10 host times (7 unbucketed calls' time until return, nothing waited for, and
#   the 3 same-device bucketed calls', none waited for): 10.4-16.6 ms for 1-14 programs, whatever
#   the leaf count (201 or 291) and the program arrays (603-1758); leave-one-record-out fits give
#   7.1-7.7 ms and 307-398 us. Neither is explained yet (CPU: ~0.2 ms of Python per call on the
#   stacked tree, ~1-3 ms on the per-layer one; bench/README.md): the GPU runs record `host_phases`.
# * leaf_arg_s 3 us per program array and leaf_assemble_s 30 us per Python-made array: CPU
#   measurements of the cell-classes implementation (bench/README.md), not separable in the GPU run.
# * inter-host 400 Gb/s InfiniBand per GPU (not measured).
H100_SXM = Hardware(
    name="h100_sxm",
    devices_per_host=8,
    d2d_bandwidth=272e9,
    inter_host_bandwidth=45e9,
    hbm_bandwidth=2.15e12,
    intra_mesh_collective_bandwidth=225e9,
    transfer_latency_s=28e-6,
    d2d_device_bandwidth=272e9,
    dispatch_s=366e-6,
    collective_latency_s=40e-6,
    leaf_arg_s=3e-6,
    leaf_assemble_s=30e-6,
    call_s=7.5e-3,
)

DEFAULT = H100_SXM

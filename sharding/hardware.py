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

`d2d_device_bandwidth` and the last four have defaults (older profile files lack them).
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
  extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

  def __post_init__(self):
    if not self.d2d_device_bandwidth:
      object.__setattr__(self, "d2d_device_bandwidth", 2 * self.d2d_bandwidth)
    for f in ("d2d_bandwidth", "d2d_device_bandwidth", "inter_host_bandwidth", "hbm_bandwidth", "intra_mesh_collective_bandwidth"):
      if not getattr(self, f) > 0:
        raise ValueError(f"Hardware.{f} must be > 0, got {getattr(self, f)!r}")
    for f in ("transfer_latency_s", "dispatch_s", "collective_latency_s", "leaf_arg_s", "leaf_assemble_s"):
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


# 4x H100 SXM 80GB, NVLink 4, one host, jax 0.11.2. From bench/results/realloc-h100.json (runs of
# 2026-11-26, the implementation before cell classes, which made one Python array per leaf):
# * intra_mesh_collective_bandwidth 225 GB/s received per device and collective_latency_s 40 us per
#   array: the same-device reshards (one XLA collective per leaf) of 7B fsdp4 -> tensor4 (2.5 GB per
#   device, 291 leaves: 21.5 ms measured, 22.8 predicted) and of 1B (201 leaves: 11.7 ms, 10.1);
# * d2d_bandwidth 270 GB/s per device pair (raw copy of 7B tensor2 -> fsdp4: 6.7 GB per pair in
#   25 ms), d2d_device_bandwidth 360 GB/s into or out of one device from several (NVLink 4: 450 GB/s
#   per direction), HBM copy 2.58 TB/s, inter-host 400 Gb/s InfiniBand per GPU (not measured);
# * host: dispatch_s 40 us per program and transfer_latency_s 20 us per copied buffer (earlier
#   partial run: 804 single-shard copies took 18 ms where their bytes needed 6); leaf_arg_s 3 us per
#   program array and leaf_assemble_s 30 us per Python-assembled array (CPU measurements of this
#   implementation, bench/README.md).
# Not refitted: `bench/realloc.py --fit` on the cell-classes run (4x H100, 2026-11-26 14:48, 7 records)
# gives d2d_bandwidth 48 GB/s, d2d_device_bandwidth 151 GB/s and transfer_latency_s 95 us, which the
# raw copies of the same run contradict (272 GB/s out of each source device; 804 transfers in 30 ms),
# and terms that swing up to 45x when one record is left out: the model lacks the run's ~11 ms host
# time per call and the pack/unpack device time, and the fit hides them in these terms (bench/README.md).
H100_SXM = Hardware(
    name="h100_sxm",
    devices_per_host=8,
    d2d_bandwidth=270e9,
    inter_host_bandwidth=45e9,
    hbm_bandwidth=2.58e12,
    intra_mesh_collective_bandwidth=225e9,
    transfer_latency_s=20e-6,
    d2d_device_bandwidth=360e9,
    dispatch_s=40e-6,
    collective_latency_s=40e-6,
    leaf_arg_s=3e-6,
    leaf_assemble_s=30e-6,
)

DEFAULT = H100_SXM

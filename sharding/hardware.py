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
  costs 2 B / hbm_bandwidth): prices packs, unpacks, and XLA's layout copies and slices in reshards.
* `intra_mesh_collective_bandwidth` - bytes *received per device* per second by a jitted reshard
  (all-to-all / all-gather) inside one mesh.
* `transfer_latency_s` - host cost of one device-to-device buffer copy inside a batched `device_put`.
* `dispatch_s` - host cost of dispatching one jitted program (reshard, pack, unpack).
* `collective_latency_s` - device cost of one array's collective inside a reshard program (XLA
  emits one collective per array; on GPUs each is a kernel launch and a synchronisation).
* `collective_host_s` - host cost of one array's collective when its reshard program is dispatched
  (on top of `dispatch_s` and `leaf_arg_s`).
* `leaf_arg_s` - host cost per array argument or output of a jitted program (the C++ dispatch
  path), and per leaf of a `reallocate` call (flattening, the plan lookup).
* `leaf_assemble_s` - host cost of one array assembled in Python from per-device buffers
  (`jax.make_array_from_single_device_arrays`): one per cell class of a bucket, and one per
  pass-through leaf.
* `call_s` - fixed host cost of one `reallocate` call, whatever its plan.

`d2d_device_bandwidth` and the fields after it have defaults (older profile files lack them;
`call_s` and `collective_host_s` default to 0). `realloc_cost` simulates the call as it runs
(`sharding/_realloc_cost.py`): the host dispatching bucket after bucket, one compute stream per
device, the links.

`H100_SXM` is the default, `H200` the H200's (`for_card` picks by `jax.Device.device_kind`) and `H200_X4`
a 4x H200 host's (`for_machine` adds the process's device count), from measurements on H100 SXM and H200
(NVLink) with jax 0.11.2 (DESIGN.md section 4); `bench/realloc.py --fit` checks them against benchmark
runs (see bench/README.md).
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
  collective_host_s: float = 0.0
  extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

  def __post_init__(self):
    if not self.d2d_device_bandwidth:
      object.__setattr__(self, "d2d_device_bandwidth", 2 * self.d2d_bandwidth)
    for f in ("d2d_bandwidth", "d2d_device_bandwidth", "inter_host_bandwidth", "hbm_bandwidth", "intra_mesh_collective_bandwidth"):
      if not getattr(self, f) > 0:
        raise ValueError(f"Hardware.{f} must be > 0, got {getattr(self, f)!r}")
    for f in ("transfer_latency_s", "dispatch_s", "collective_latency_s", "leaf_arg_s", "leaf_assemble_s", "call_s",
              "collective_host_s"):
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


# H100 SXM 80GB, NVLink 4, jax 0.11.2. Sources, runs of 2026-11-26 (`bench/realloc.py --fit` reprices them):
# * d2d_bandwidth, d2d_device_bandwidth and intra_mesh_collective_bandwidth 389 GB/s: the raw copies of the
#   2x H100 run (bench/results/realloc-h100x2.json): 7B single (1 of 2) -> fsdp2 moved 13.5 GB from one GPU to
#   the other in 34.7 ms; the same links carry the collectives (a 2-GPU mesh has one peer per device). The
#   4x H100 machine's raw copies reached 272 GB/s out of one GPU to several peers (realloc-h100.json, 7B
#   tensor2 -> fsdp4: 6.74 GB per source GPU in 24.8 ms): a machine of that kind wants its own profile.
# * transfer_latency_s 19 us per copied buffer: the same raw copies, (time - bytes at 389 GB/s) / transfers,
#   the median over the run's 16 records (4x H100: 28 us).
# * hbm_bandwidth 2.4 TB/s, collective_latency_s 20 us: fitted to every timed variant of the 2x H100 run
#   (mean |log(predicted / measured)|, a grid; the link and host terms held); leave one record out: 2.2-2.4
#   TB/s, 20-30 us. Between the 2.15 TB/s of a jitted elementwise pass (calls-h100.json) and the ~3 TB/s
#   of a plain device copy, as copies and transposes should be.
# * call_s 0.06 ms: the call's Python prologue, the "python" host phase of that run's slice-only calls
#   (data2 -> fsdp2: 0.05-0.07 ms). An earlier least-squares fit with a free call_s put 0.91 ms there: it
#   absorbed the per-program and per-array host time of the general path and overpriced short calls.
# * dispatch_s 236 us per program and per batched device_put, leaf_arg_s 4.8 us per program array,
#   collective_host_s 21 us per collective: non-negative least squares on that run's 16 unbucketed calls'
#   host times (time until return, nothing waited for; `host_phases_s` shows one device_put of one buffer
#   at 0.2-0.3 ms, as much as a program); leave one record out: 216-260 us, 4.4-4.9 us, 19-22 us. The 4x
#   H100 run's per-layer calls (11 ms each whatever their counts, no host phases recorded) do not fit
#   these: host time is the least portable term.
# * leaf_assemble_s 30 us per Python-made array: CPU measurements of the cell-classes implementation
#   (bench/README.md), not separable in the GPU runs.
# * inter-host 400 Gb/s InfiniBand per GPU (not measured).
H100_SXM = Hardware(
    name="h100_sxm",
    devices_per_host=8,
    d2d_bandwidth=389e9,
    inter_host_bandwidth=45e9,
    hbm_bandwidth=2.4e12,
    intra_mesh_collective_bandwidth=389e9,
    transfer_latency_s=19e-6,
    d2d_device_bandwidth=389e9,
    dispatch_s=236e-6,
    collective_latency_s=20e-6,
    leaf_arg_s=4.8e-6,
    leaf_assemble_s=30e-6,
    call_s=0.06e-3,
    collective_host_s=21e-6,
)

# H200 (141 GB HBM3e, NVLink 4), jax 0.11.2, the 2x H200 run (bench/results/realloc-h200x2.json), same methods:
# * d2d_bandwidth (and per device, and the collectives) 386 GB/s, transfer_latency_s 33 us: that run's raw
#   copies (7B single (1 of 2) -> fsdp2: 13.5 GB one way in 34.9 ms; latency the median of what each record
#   leaves per transfer). The NVLink is the H100's: the same speed as the 2x H100 run's 389 GB/s.
# * hbm_bandwidth 3.2 TB/s, collective_latency_s 30 us: the grid fit over every timed variant of the run;
#   leave one record out 3.0-3.2 TB/s, 10-60 us. 1.33x the H100's 2.4 (datasheets: 4.8 / 3.35 = 1.43).
# * call_s 0.075 ms: the "python" phase of the run's slice-only calls (0.06 and 0.09 ms).
# * dispatch_s 270 us, leaf_arg_s 6.8 us, collective_host_s 53 us: least squares on the run's 8 unbucketed
#   host times; leave one out 222-363 us, 0-11 us, 43-66 us (this machine's host is slower per program).
H200 = Hardware(
    name="h200",
    devices_per_host=8,
    d2d_bandwidth=386e9,
    inter_host_bandwidth=45e9,
    hbm_bandwidth=3.2e12,
    intra_mesh_collective_bandwidth=386e9,
    transfer_latency_s=33e-6,
    d2d_device_bandwidth=386e9,
    dispatch_s=270e-6,
    collective_latency_s=30e-6,
    leaf_arg_s=6.8e-6,
    leaf_assemble_s=30e-6,
    call_s=0.075e-3,
    collective_host_s=53e-6,
)

# 4x H200 host (the lent `nvidia-h200-x4` kind: NVLink 4 between all four, 64 CPU cores), jax 0.11.2: ONE
# profile fitted to both 4x H200 runs, `bench/realloc.py --fit bench/results/realloc-h200x4-onecall.json
# bench/results/realloc-h200x4-rounds1g.json --joint` (2026-11-26 and 2026-11-27; 16 transitions, 96 timed calls):
# * d2d_bandwidth (and per device, and the collectives) 363 GB/s, transfer_latency_s 63 us: the two runs' raw
#   copies (the fastest record's bytes out of its busiest GPU; latency the median of what each leaves per copy).
# * hbm_bandwidth 3.8 TB/s, collective_latency_s 20 us, dispatch_s 150 us: the grid; leaf_arg_s 4.7 us and
#   collective_host_s 72 us: least squares on the unbucketed calls' host times at the grid point.
# * Every default call of both runs within 25% of this profile (max |error| 19%); fitted on either run alone,
#   15 of the other run's 16 default calls are (the miss: 1B fsdp4 -> tensor2 (2 of 4), +27%, 4.6 ms).
# This host dispatches a program in less time than the 2x H200 host (`H200`: 270 us, fitted with dispatch_s
# in the least squares, which the one-bucket calls cannot separate from the per-array term): host time is
# a property of the machine, not the card, so a machine kind with its own runs gets its own profile.
H200_X4 = Hardware(
    name="h200_x4",
    devices_per_host=8,
    d2d_bandwidth=363e9,
    inter_host_bandwidth=45e9,
    hbm_bandwidth=3.8e12,
    intra_mesh_collective_bandwidth=363e9,
    transfer_latency_s=63e-6,
    d2d_device_bandwidth=363e9,
    dispatch_s=150e-6,
    collective_latency_s=20e-6,
    leaf_arg_s=4.7e-6,
    leaf_assemble_s=30e-6,
    call_s=0.075e-3,
    collective_host_s=72e-6,
)

PROFILES = {"h100": H100_SXM, "h200": H200}  # by card: `for_card`
MACHINE_PROFILES = {("h200", 4): H200_X4}  # by (card, GPUs per process): `for_machine`
DEFAULT = H100_SXM


def for_card(device_kind: str) -> Hardware:
  """The profile of a card, by `jax.Device.device_kind` ("NVIDIA H200", "NVIDIA H100 80GB HBM3"):
  the first of `PROFILES` whose key is a word of the name (case-insensitive); `DEFAULT` for any other card
  (CPU included), since realloc_cost needs some profile to rank plans."""
  words = _card_words(device_kind)
  return next((hw for key, hw in PROFILES.items() if key in words), DEFAULT)


def _card_words(device_kind: str) -> set[str]:
  return set(device_kind.lower().replace("-", " ").split())  # Whole words: "gh200" is not "h200".


def for_machine(device_kind: str, local_devices: int) -> Hardware:
  """The profile of a machine kind: `MACHINE_PROFILES[(card, local_devices)]` where one was measured
  (host dispatch costs differ between hosts with the same card), else `for_card`."""
  words = _card_words(device_kind)
  return next((hw for (key, n), hw in MACHINE_PROFILES.items() if key in words and n == local_devices),
              for_card(device_kind))


_LOCAL: list = []


def local_default() -> Hardware:
  """`for_machine` of this process's first device and device count (cached): the profile `reallocate`,
  `realloc_cost` and `plans` use when given none, so a call on a 4x H200 host plans and prices with
  `H200_X4`, on other H200 machines with `H200`."""
  if not _LOCAL:
    import jax
    _LOCAL.append(for_machine(jax.devices()[0].device_kind, jax.local_device_count()))
  return _LOCAL[0]

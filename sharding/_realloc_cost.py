"""Pricing half of `sharding.realloc`: what a planned reallocation costs on a `Hardware` profile.

The planner (`sharding/_realloc_plan.py`) turns each bucket of a tree into a `BucketLoad`: the bytes
and counts its execution moves and dispatches, whatever the hardware. This module turns loads into
seconds:

* `price(load, hw)`: one bucket's host, device and link seconds, the stages simply added (for
  summaries and the planner's per-leaf choice).
* `timeline(loads, hw, schedule)`: the whole call as the implementation runs it, a small
  discrete-event simulation of the host thread, one compute stream per device and the links:

  - The host dispatches, in the schedule's order, per bucket: the reshard programs (collectives),
    the packs, the copies, then the unpack; each costs host time (`call_s` once: the call's Python
    prologue, flatten and plan lookup; `dispatch_s` per program and per batched `device_put`,
    `leaf_arg_s` per program array and per leaf, `collective_host_s` per collective,
    `transfer_latency_s` per copied buffer, `leaf_assemble_s` per Python-made array). Nothing runs
    before it is dispatched, so a call's first program starts after `call_s` plus its own dispatch:
    a slice-only call (data2 -> fsdp2) is one short dispatch, then HBM passes.
  - A device's compute stream runs its programs in dispatch order: a reshard program's collectives
    (bytes received per device over the collective bandwidth, `collective_latency_s` per array,
    and the HBM passes of XLA's layout copies and slices, `collective_hbm_bytes`), a pack (its
    written bytes read and written once), an unpack (its built bytes read and written once).
  - Copies start when their sources are packed (or resharded) and the links are free, and **not
    before every program already dispatched on their destination device has finished**: the GPU
    client allocates a copy's destination buffer in the destination's compute-stream order (its
    allocation model is "compute synchronized"). That is why the serial schedule cannot overlap
    bucket b+1's copies with bucket b's unpack on the same device, and the pipelined one can
    (2x H100: single -> fsdp2, 7B, serial 25.2 ms, pipelined 21.4 ms).
  - A memory-bound wait (`reallocate`'s bucket bound) holds the host until that bucket is done.

  The result is the time until every output is ready, max(host, devices).

HBM passes are priced at `hbm_bandwidth`, bytes read plus bytes written.
"""

from __future__ import annotations

import dataclasses

from sharding.hardware import Hardware


@dataclasses.dataclass(frozen=True)
class BucketLoad:
  """What one bucket's execution moves and dispatches, whatever the hardware: the quantities that
  `price` and `timeline` turn into seconds (so a profile can be refitted to measured runs without
  replanning)."""

  collective_bytes: int  # bytes received per device by the bucket's reshards, summed over leaves
  collectives: int       # arrays resharded by XLA collectives (one each; local slices are not collectives)
  packed: dict           # source device -> bytes its pack program writes
  pairs: dict            # (source, target device) -> bytes copied
  built: dict            # target device -> bytes its unpack program writes
  programs: int          # jitted programs dispatched
  transfers: int         # buffers copied between devices
  assembled_arrays: int  # arrays assembled in Python from per-device buffers
  program_arrays: int    # array arguments and outputs of jitted programs, plus one per leaf
  collective_hbm_bytes: int = 0  # per device, XLA's layout copies / slices around the reshards (read + written)
  collective_devices: tuple = ()  # devices that run the bucket's reshard programs
  collective_programs: int = 0    # of `programs`: the reshard programs
  collective_arrays: int = 0      # of `program_arrays`: their arguments and outputs
  pack_programs: int = 0          # of `programs`: the packs
  pack_arrays: int = 0            # of `program_arrays`: the packs' arguments and outputs
  holds_intermediates: bool = False  # reallocate waits for such buckets to bound memory
  transfer_calls: int = 1         # batched device_puts the copies are issued in (rounds; 0 or 1 if no copies)


def link_seconds(pair_bytes: dict, hw: Hardware) -> float:
  """Seconds for device-to-device copies of `pair_bytes[(src, dst)]` bytes, all in flight at once:
  the slowest pair, or the busiest device's total in or out, whichever is longer."""
  out: dict = {}
  inn: dict = {}
  slowest = 0.0
  for (s, d), b in pair_bytes.items():
    out[s] = out.get(s, 0) + b
    inn[d] = inn.get(d, 0) + b
    bw = hw.inter_host_bandwidth if s.process_index != d.process_index else hw.d2d_bandwidth
    slowest = max(slowest, b / bw)
  return max(slowest, max([*out.values(), *inn.values(), 0]) / hw.d2d_device_bandwidth)


def collective_seconds(load: BucketLoad, hw: Hardware) -> float:
  """Device seconds of one bucket's reshard programs: bytes received per device, one latency per
  resharded array, XLA's extra HBM passes."""
  return (load.collective_bytes / hw.intra_mesh_collective_bandwidth + load.collectives * hw.collective_latency_s
          + load.collective_hbm_bytes / hw.hbm_bandwidth)


def _host_phases(load: BucketLoad, hw: Hardware) -> tuple[float, float, float, float]:
  """Host seconds to dispatch the bucket's reshards, packs, copies, and the rest (arrays, unpacks)."""
  coll = (load.collective_programs * hw.dispatch_s + load.collective_arrays * hw.leaf_arg_s
          + load.collectives * hw.collective_host_s)
  pack = load.pack_programs * hw.dispatch_s + load.pack_arrays * hw.leaf_arg_s
  # Each batched `device_put` (one per round of copies) is one call through the runtime, priced like a
  # program's dispatch, plus each copied buffer (host phases of the 2x H100 and 2x H200 runs: 0.2-0.4 ms
  # for ONE buffer).
  xfer = (load.transfers > 0) * max(load.transfer_calls, 1) * hw.dispatch_s + load.transfers * hw.transfer_latency_s
  rest = ((load.programs - load.collective_programs - load.pack_programs) * hw.dispatch_s
          + (load.program_arrays - load.collective_arrays - load.pack_arrays) * hw.leaf_arg_s
          + load.assembled_arrays * hw.leaf_assemble_s)
  return coll, pack, xfer, rest


def price(load: BucketLoad, hw: Hardware) -> tuple[float, float, float]:
  """(host, device, link) seconds of one bucket, its stages added: host = dispatches, transfers and
  arrays; device = the reshards, the pack pass over HBM (read + write of every packed byte on the
  busiest source device), the copies over the busiest link, the unpack pass (every built byte on
  the busiest target device). The call's fixed host time (`hw.call_s`) is not included."""
  host_s = sum(_host_phases(load, hw))
  copy_s = link_seconds(load.pairs, hw)
  device_s = (collective_seconds(load, hw) + 2 * max([*load.packed.values(), 0]) / hw.hbm_bandwidth + copy_s
              + 2 * max([*load.built.values(), 0]) / hw.hbm_bandwidth)
  return host_s, device_s, copy_s


SCHEDULES = ("serial", "pipelined")


class _Sim:
  """State of `timeline`'s simulation: the host clock, each device's compute stream, the links."""

  def __init__(self, hw: Hardware):
    self.hw = hw
    self.host = hw.call_s
    self.free: dict = {}  # device -> when its compute stream has run everything dispatched to it
    self.link = 0.0       # when the links have carried every copy dispatched so far

  def _run(self, devices, start: float, seconds) -> float:
    """Runs work on the compute streams of `devices` (one SPMD program: all start together);
    `seconds` is one duration or {device: duration}. Returns when the last one ends."""
    start = max([start, *(self.free.get(d, 0.0) for d in devices)])
    end = start
    for d in devices:
      t = start + (seconds[d] if isinstance(seconds, dict) else seconds)
      self.free[d] = t
      end = max(end, t)
    return end

  def send(self, load: BucketLoad) -> tuple[float, float]:
    """Dispatches the reshards, packs and copies; returns (copies done, reshards done)."""
    hw = self.hw
    coll_h, pack_h, xfer_h, _ = _host_phases(load, hw)
    self.host += coll_h
    ready = 0.0
    if load.collective_devices:
      ready = self._run(load.collective_devices, self.host, collective_seconds(load, hw))
    self.host += pack_h
    packed_at = ready
    for d, nbytes in load.packed.items():
      packed_at = max(packed_at, self._run((d,), self.host, 2 * nbytes / hw.hbm_bandwidth))
    self.host += xfer_h
    copied = ready
    if load.pairs:
      # Destination buffers are allocated in the destination's compute-stream order.
      start = max([self.host, self.link, packed_at, *(self.free.get(d, 0.0) for _, d in load.pairs)])
      copied = self.link = start + link_seconds(load.pairs, hw)
    return copied, ready

  def recv(self, load: BucketLoad, sent: tuple[float, float]) -> float:
    """Dispatches the unpack; returns when the bucket's outputs are all ready."""
    hw = self.hw
    self.host += _host_phases(load, hw)[3]
    copied, ready = sent
    into = {d for _, d in load.pairs}  # a device's part of the unpack waits for its own inputs only
    done = max(copied, ready)
    for d, nbytes in load.built.items():
      done = max(done, self._run((d,), max(self.host, copied if d in into else 0.0), 2 * nbytes / hw.hbm_bandwidth))
    return done


def timeline(loads, hw: Hardware, schedule: str = "serial", waits: bool = True) -> tuple[float, float]:
  """(host seconds until `reallocate` returns, seconds until every output is ready) of the buckets'
  loads dispatched under `schedule`, simulated as in the module docstring. `waits`: the call has a
  bucket bound (`bucket_bytes` not None), so it waits for bucket b-2 (serial) before dispatching a
  bucket with intermediates, exactly as `reallocate` does."""
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
  pipelined = schedule == "pipelined"
  sim = _Sim(hw)
  inflight: list[float] = []  # done times of received buckets with intermediates, not yet waited for
  pending = None
  end = 0.0

  def receive(load, sent):
    nonlocal end
    done = sim.recv(load, sent)
    end = max(end, done)
    if load.holds_intermediates:
      inflight.append(done)

  for load in loads:
    if waits and load.holds_intermediates and len(inflight) >= (1 if pipelined else 2):
      sim.host = max(sim.host, inflight.pop(0))
    sent = sim.send(load)
    end = max(end, sent[1])
    if not pipelined:
      receive(load, sent)
      continue
    if pending is not None:
      receive(*pending)
    pending = (load, sent)
  if pending is not None:
    receive(*pending)
  return sim.host, max(sim.host, end)


def tree_seconds(loads, hw: Hardware, schedule: str = "serial", waits: bool = True) -> float:
  """Predicted seconds of a whole reallocation from its buckets' loads: `timeline`'s time until every
  output is ready."""
  return timeline(loads, hw, schedule, waits)[1]

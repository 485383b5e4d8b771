"""List-scheduling simulation of a few unrolled RLHF iterations under a plan.

Tasks come from `Graph.unroll(n)` (given as `[((iteration, call), [dependencies])]`, valid order).
Each call occupies its mesh's devices for its estimated seconds; calls on overlapping meshes
serialise (a device runs one task at a time), calls on disjoint meshes overlap. A model lives in
its *home* layout (its last train call's layout; a frozen model's first call's layout); a call under
another placement first needs a reallocation task, home -> call layout, that occupies the devices of
both meshes. Layouts are compared by `space.placement` (the parameters' devices and shards): a call
that differs from home only in micro-batches (or in an equivalent rule set name) runs on the home
parameters, with no task and no extra copy; a reallocation priced at zero adds no task either. As in
`real_jax.runtime.Engine`, the moved copy lives from its reallocation until the last call of the same
iteration that reads that placement (a model keeps at most one copy), so a placement read by several
calls of an iteration is moved once, and a frozen model read away from home is moved every iteration.
Frozen models listed in the plan's `offload` rest in host memory and are loaded (host bandwidth)
before each of their calls, straight into the call's layout, and count in memory only while it runs. The
engine loads such a model into its home layout once the work before it on those devices is done, and rests
it again after its last call of the iteration: the same for a frozen model with one call per iteration
(every graph the planner knows: PPO's reference and reward); one with several calls would stay on the
devices between them, which this does not count.

Memory per device: resident parameters of every model in its home layout (+ optimizer state for
trained models), the reallocated copies alive at the time (above), and, while a call runs, its
transient bytes (activations / KV cache / gathered weights). A plan whose peak exceeds the profile's
`usable_memory_bytes` on any device is infeasible (time = inf).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from search.estimator import CallCost, CallSpec
from search.profile import Profile
from search.space import placement
from sharding import Layout

Task = tuple[tuple[int, str], Sequence[tuple[int, str]]]


@dataclasses.dataclass(frozen=True)
class Event:
  """One bar of the timeline: a call or a reallocation on devices [start, start + size)."""

  name: str
  kind: str          # "call", "realloc" or "load"
  iteration: int
  t0: float
  t1: float
  device_start: int
  device_size: int
  device_start2: int = -1  # reallocation: the destination mesh
  device_size2: int = 0


@dataclasses.dataclass
class SimResult:
  time: float                       # makespan / iterations (inf when infeasible)
  makespan: float
  iterations: int
  call_seconds: dict[str, float]
  realloc_seconds: float            # total over the simulated iterations
  peak_memory: np.ndarray           # bytes per device
  feasible: bool
  reason: str = ""
  events: list[Event] = dataclasses.field(default_factory=list)
  offload: frozenset[str] = frozenset()  # the frozen models simulated resting in host memory


def home_layouts(specs: Mapping[str, CallSpec], layouts: Mapping[str, Layout], order: Sequence[str]) -> dict:
  """Model -> home layout: its last train call's layout, else its first call's."""
  homes = {}
  for name in order:
    if specs[name].kind == "train_step":
      homes[specs[name].model] = layouts[name]
  for name in order:
    homes.setdefault(specs[name].model, layouts[name])
  return homes


def resident_bytes(spec: CallSpec, layout: Layout, trained: bool) -> float:
  m, st = spec.shape, layout.strategy
  per = m.params / (st.fsdp * st.tensor)
  return per * m.param_bytes + (per * 8 if trained else 0.0)


def simulate(tasks: Sequence[Task], specs: Mapping[str, CallSpec], layouts: Mapping[str, Layout],
             seconds: Mapping[str, float], costs: Mapping[str, CallCost], profile: Profile, num_devices: int,
             realloc: Callable[[str, Layout, Layout], float], *, offload: frozenset[str] = frozenset(),
             record: bool = False) -> SimResult:
  """Simulates `tasks` under `layouts` (call -> Layout); seconds/costs per call from the estimator."""
  order = list(dict.fromkeys(n for (_, n), _ in tasks))
  trained = {specs[n].model for n in order if specs[n].kind == "train_step"}
  homes = home_layouts(specs, layouts, order)
  free = np.zeros(num_devices)
  mem = np.zeros(num_devices)
  for model, home in homes.items():
    if model in offload and model not in trained:
      continue
    some = next(specs[n] for n in order if specs[n].model == model)
    dm = home.device_mesh
    mem[dm.start:dm.stop] += resident_bytes(some, home, model in trained)
  peak = mem.copy()
  end: dict[tuple[int, str], float] = {}
  ready = {m: 0.0 for m in homes}       # when the model's current version is available
  copies: dict[str, dict] = {m: {} for m in homes}  # placement of the current version -> the layout holding it
  # The last task of each iteration reading a model under a placement: its copy is dropped after it.
  last_reader = {(it, specs[n].model, placement(layouts[n])): k for k, ((it, n), _) in enumerate(tasks)}
  specs_of = {specs[n].model: specs[n] for n in reversed(order)}  # (a model's calls share its shape)

  def drop(model: str, where) -> None:
    lay = copies[model].pop(where)
    mem[lay.device_mesh.start:lay.device_mesh.stop] -= resident_bytes(specs_of[model], lay, False)
  events: list[Event] = []
  total_realloc = 0.0
  for k, ((it, name), deps) in enumerate(tasks):
    spec, lay = specs[name], layouts[name]
    model, dm = spec.model, lay.device_mesh
    t_dep = max((end[d] for d in deps if d in end), default=0.0)
    home = homes[model]
    at_home = placement(lay) == placement(home)
    t_ready = ready[model]
    extra = 0.0
    if model in offload and model not in trained:
      dur = resident_bytes(spec, lay, False) / profile.host_bandwidth
      t0 = max(t_ready, float(free[dm.start:dm.stop].max()))
      free[dm.start:dm.stop] = t0 + dur
      total_realloc += dur
      t_ready = t0 + dur
      extra = resident_bytes(spec, lay, False)
      if record:
        events.append(Event(f"load {model}", "load", it, t0, t0 + dur, dm.start, dm.size))
    elif not at_home and placement(lay) not in copies[model]:
      dur = realloc(model, home, lay)
      for where in list(copies[model]):
        drop(model, where)
      copies[model][placement(lay)] = lay
      mem[dm.start:dm.stop] += resident_bytes(specs_of[model], lay, False)
      if dur > 0.0:
        h = home.device_mesh
        both = np.concatenate([free[h.start:h.stop], free[dm.start:dm.stop]])
        t0 = max(t_ready, float(both.max()))
        free[h.start:h.stop] = t0 + dur
        free[dm.start:dm.stop] = t0 + dur
        total_realloc += dur
        t_ready = t0 + dur
        if record:
          events.append(Event(f"{model}", "realloc", it, t0, t0 + dur, h.start, h.size, dm.start, dm.size))
    t0 = max(t_dep, t_ready, float(free[dm.start:dm.stop].max()))
    t1 = t0 + seconds[name]
    free[dm.start:dm.stop] = t1
    end[(it, name)] = t1
    c = costs[name]
    np.maximum(peak[dm.start:dm.stop], mem[dm.start:dm.stop] + c.temp_bytes + extra +
               (0.0 if at_home or spec.kind != "train_step" else c.arg_bytes), out=peak[dm.start:dm.stop])
    if not at_home and last_reader[(it, model, placement(lay))] == k and placement(lay) in copies[model]:
      drop(model, placement(lay))
    if spec.kind == "train_step":
      ready[model] = t1
      for where in list(copies[model]):
        drop(model, where)
    if record:
      events.append(Event(name, "call", it, t0, t1, dm.start, dm.size))
  makespan = max(end.values(), default=0.0)
  iters = 1 + max((i for (i, _), _ in tasks), default=0)
  feasible = bool(peak.max() <= profile.usable_memory_bytes)
  reason = "" if feasible else (f"device {int(peak.argmax())} needs {peak.max() / 2**30:.1f} GiB > "
                                f"{profile.usable_memory_bytes / 2**30:.1f} GiB usable")
  time = makespan / iters if feasible else math.inf
  return SimResult(time, makespan, iters, {n: seconds[n] for n in order}, total_realloc, peak, feasible, reason,
                   events, frozenset(offload) & frozenset(homes) - trained)

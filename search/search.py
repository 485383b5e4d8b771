"""Plan search: exhaustive where the space is small, Metropolis MCMC over one-call moves elsewhere.

`Planner(specs, tasks, estimator, num_devices)` precomputes, for every call, its candidate layouts
and their estimated seconds and memory (`search.space`), so one simulation costs tens of
microseconds per task. Before any search the two heuristic baselines are scored, and they are always
reported beside the chosen plan:

* colocated: every call on all devices with one (data, fsdp, tensor) shared by all calls (each call
  keeps its best micro-batch count), the best such strategy;
* disaggregated: each model on its own disjoint mesh, sized in proportion to its work (its calls'
  seconds on the whole cluster) and rounded to a valid mesh size; each call takes its best strategy
  on its model's mesh.

MCMC (simulated annealing): start from the best baseline; a move re-draws one call's layout (half
the time among layouts on the same mesh, half anywhere), and 30% of moves carry the model's other
calls along to the same mesh (same layout where valid, else their best there: a single-call move
cannot leave a plan where a model's calls share a layout and no reallocation happens); accept with probability
exp(-(t_new - t_old) / T), T decaying geometrically from 10% to 0.1% of the start time; keep the
best plan seen. Stops after `steps` moves or `time_budget_s`. The temperature follows the step count, or,
when the first moves' pace says the budget will end the search first, the time spent: a search cut by its
budget still finishes cooling, and one that finishes its steps in time is reproducible by seed.

Host offload: a plan that does not fit is scored again with frozen models (those no train call updates,
such as PPO's reference and reward) resting in host memory between their calls (`ExecutionPlan.offload`;
the simulator charges a host load before each of their calls and counts their memory only while they run),
every non-empty set of them, and takes the fastest that fits. Offload never makes a plan faster, only
feasible, so plans that fit without it are scored as they are. The baselines are scored the same way: a
colocated strategy that fits only with the reference in host memory is a heuristic a practitioner would
use too. `Planner(..., offload=False)` turns this off.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import time
from collections.abc import Mapping, Sequence

from search.estimator import CallSpec, Estimator
from search.plan import ExecutionPlan
from search.simulate import SimResult, Task, simulate
from search.space import ReallocPricer, candidates
from sharding import DeviceMesh, Layout, strategies


@dataclasses.dataclass
class SearchResult:
  plan: ExecutionPlan
  result: SimResult
  baselines: dict[str, tuple[ExecutionPlan, SimResult]]
  method: str
  evaluated: int
  seconds: float
  space_size: float


class Planner:
  def __init__(self, specs: Mapping[str, CallSpec], tasks: Sequence[Task], estimator: Estimator, num_devices: int,
               *, realloc: ReallocPricer | None = None, micro_batches: Sequence[int] = (1, 2, 4, 8),
               offload: bool = True):
    self.specs = dict(specs)
    self.tasks = list(tasks)
    self.est = estimator
    self.profile = estimator.profile
    self.n = num_devices
    self.per_host = min(self.profile.devices_per_host, num_devices)
    self.realloc = realloc or ReallocPricer(specs, self.profile)
    self.calls = list(dict.fromkeys(n for (_, n), _ in self.tasks))
    trained = {self.specs[c].model for c in self.calls if self.specs[c].kind == "train_step"}
    frozen = [m for m in dict.fromkeys(self.specs[c].model for c in self.calls) if m not in trained]
    # Host-offload sets tried for a plan that does not fit (module docstring), fewest models first.
    self.offload_sets = [frozenset(s) for k in range(1, len(frozen) + 1)
                         for s in itertools.combinations(frozen, k)] if offload else []
    self.cands: dict[str, list[Layout]] = {}
    self.secs: dict[str, dict[Layout, float]] = {}
    self.costs: dict[str, dict] = {}
    for c in self.calls:
      spec = self.specs[c]
      lays = candidates(spec, num_devices, self.per_host, micro_batches)
      if not lays:
        raise ValueError(f"call {c!r}: no valid layout on {num_devices} devices (batch {spec.batch})")
      memo: dict = {}
      secs, costs, keep = {}, {}, []
      for lay in lays:
        # Analytic costs do not depend on where the mesh starts (host-spanning is by size): reuse.
        k = (lay.device_mesh.size, lay.strategy) if not self.est._can_compile(spec, lay) else lay
        if k not in memo:
          cost = self.est.cost(spec, lay)
          memo[k] = (cost, spec.repeats * cost.seconds(self.profile, spec.shape.n_layers)
                     * self.profile.factor(spec.kind, "time"))
        cost, s = memo[k]
        if cost.temp_bytes + cost.arg_bytes > self.profile.usable_memory_bytes:
          continue  # Cannot fit even alone.
        secs[lay], costs[lay] = s, cost
        keep.append(lay)
      if not keep:
        raise ValueError(f"call {c!r}: no layout fits {self.profile.usable_memory_bytes / 2**30:.0f} GiB per device "
                         f"(memory_bytes less the {self.profile.memory_reserve:.0%} reserve)")
      self.cands[c], self.secs[c], self.costs[c] = keep, secs, costs
      by_mesh: dict[DeviceMesh, list[Layout]] = {}
      for lay in keep:
        by_mesh.setdefault(lay.device_mesh, []).append(lay)
      setattr(self, f"_mesh_{c}", by_mesh)
    self.evaluated = 0

  @property
  def space_size(self) -> float:
    return math.prod(len(v) for v in self.cands.values())

  def evaluate(self, layouts: Mapping[str, Layout], *, record: bool = False,
               offload: frozenset[str] | None = None) -> SimResult:
    """Simulates the plan. offload None: as it is, and if it does not fit, with each host-offload set of
    frozen models (the fastest that fits; `SimResult.offload` says which); a set: exactly that one."""
    for c in self.calls:
      if layouts[c] not in self.secs[c]:
        raise ValueError(f"call {c!r}: layout {layouts[c]} is not one of its {len(self.cands[c])} candidates "
                         f"(invalid for its shapes and batch, or it does not fit memory alone)")
    secs = {c: self.secs[c][layouts[c]] for c in self.calls}
    costs = {c: self.costs[c][layouts[c]] for c in self.calls}

    def sim(off, rec):
      self.evaluated += 1
      return simulate(self.tasks, self.specs, layouts, secs, costs, self.profile, self.n, self.realloc,
                      offload=off, record=rec)
    if offload is not None:
      return sim(frozenset(offload), record)
    r = sim(frozenset(), record)
    if r.feasible or not self.offload_sets:
      return r
    best = None
    for off in self.offload_sets:
      r2 = sim(off, False)
      if r2.feasible and (best is None or r2.time < best.time):
        best = r2
    if best is None:
      return r  # The reason names the plan without offload.
    return sim(best.offload, True) if record else best

  def plan_of(self, layouts: Mapping[str, Layout], result: SimResult, name: str = "") -> ExecutionPlan:
    """The ExecutionPlan of scored layouts: with the host offload their score needed."""
    return ExecutionPlan(dict(layouts), result.offload, name)

  def _best_on(self, call: str, mesh: DeviceMesh, shape=None) -> Layout | None:
    opts = [l for l in getattr(self, f"_mesh_{call}").get(mesh, []) if shape is None or l.strategy.shape == shape]
    return min(opts, key=lambda l: self.secs[call][l]) if opts else None

  # -- heuristics --------------------------------------------------------------------------

  def colocated(self) -> tuple[ExecutionPlan, SimResult] | None:
    whole = DeviceMesh(0, self.n)
    best = None
    for st in strategies(self.n):
      lays = {c: self._best_on(c, whole, st.shape) for c in self.calls}
      if any(v is None for v in lays.values()):
        continue
      r = self.evaluate(lays)
      if best is None or r.time < best[1].time:
        best = (self.plan_of(lays, r, f"colocated-d{st.data}f{st.fsdp}t{st.tensor}"), r)
    return best

  def _round(self, x: float) -> int:
    """Largest power-of-two mesh size <= x (so also whole hosts beyond one), at least 1."""
    if x >= self.per_host:  # A power-of-two number of hosts, so batches divide over data x fsdp.
      return 2 ** int(math.floor(math.log2(max(1, int(x // self.per_host))))) * self.per_host
    return 2 ** int(math.floor(math.log2(max(x, 1))))

  def disaggregated(self) -> tuple[ExecutionPlan, SimResult] | None:
    whole = DeviceMesh(0, self.n)
    models = list(dict.fromkeys(self.specs[c].model for c in self.calls))
    if len(models) > self.n:
      return None
    work = {m: sum(min((self.secs[c][l] for l in self.cands[c] if l.device_mesh == whole), default=1.0)
                   for c in self.calls if self.specs[c].model == m) for m in models}
    total = sum(work.values())
    def min_size(m):  # Smallest mesh size on which every call of m has a layout that fits.
      ok = [{l.device_mesh.size for l in self.cands[c]} for c in self.calls if self.specs[c].model == m]
      common = set.intersection(*ok) if ok else {1}
      return min(common) if common else self.n
    floor = {m: min_size(m) for m in models}
    sizes = {m: max(floor[m], self._round(self.n * work[m] / total)) for m in models}
    while sum(sizes.values()) > self.n:  # Shrink the largest until they fit.
      shrinkable = [m for m in models if sizes[m] > floor[m]]
      if not shrinkable:
        return None
      big = max(shrinkable, key=lambda m: sizes[m])
      sizes[big] = max(floor[big], self._round(sizes[big] - 1))
    free = self.n - sum(sizes.values())
    while free > 0:  # Grow the model with the most work per device where the spare devices allow.
      grown = False
      for m in sorted(models, key=lambda m: -work[m] / sizes[m]):
        nxt = sizes[m] * 2
        if nxt - sizes[m] <= free:
          free -= nxt - sizes[m]
          sizes[m] = nxt
          grown = True
          break
      if not grown:
        break
    start, meshes = 0, {}
    for m in sorted(models, key=lambda m: -sizes[m]):  # Decreasing sizes keep every mesh aligned.
      meshes[m] = DeviceMesh(start, sizes[m])
      start += sizes[m]
    lays = {c: self._best_on(c, meshes[self.specs[c].model]) for c in self.calls}
    if any(v is None for v in lays.values()):
      return None
    r = self.evaluate(lays)
    return self.plan_of(lays, r, "disaggregated"), r

  def baselines(self) -> dict[str, tuple[ExecutionPlan, SimResult]]:
    out = {}
    for name, fn in (("colocated", self.colocated), ("disaggregated", self.disaggregated)):
      r = fn()
      if r is not None:
        out[name] = r
    return out

  # -- search ------------------------------------------------------------------------------

  def exhaustive(self) -> tuple[dict[str, Layout], SimResult]:
    best = None
    for combo in itertools.product(*(self.cands[c] for c in self.calls)):
      lays = dict(zip(self.calls, combo))
      r = self.evaluate(lays)
      if best is None or r.time < best[1].time:
        best = (lays, r)
    return best

  def mcmc(self, start: Mapping[str, Layout], *, steps: int = 20000, time_budget_s: float = 60.0,
           seed: int = 0) -> tuple[dict[str, Layout], SimResult]:
    rng = random.Random(seed)
    cur = dict(start)
    cur_r = self.evaluate(cur)
    best = (dict(cur), cur_r)
    t0 = time.perf_counter()
    probe = max(1, min(steps // 100, 500))  # After this many moves: will the budget or the steps end the search?
    by_time = False
    for i in range(steps):
      elapsed = time.perf_counter() - t0
      if elapsed > time_budget_s:
        break
      if i == probe:  # Decided once, so a search that finishes its steps in time stays reproducible by seed.
        by_time = elapsed / i * steps > time_budget_s
      scale = best[1].time if math.isfinite(best[1].time) else 1.0  # Temperatures relative to the best time.
      done = elapsed / time_budget_s if by_time else i / max(steps - 1, 1)
      temp = scale * 0.1 * 1e-2 ** min(done, 1.0)
      c = rng.choice(self.calls)
      if rng.random() < 0.5:
        pool = getattr(self, f"_mesh_{c}")[cur[c].device_mesh]
      else:
        pool = self.cands[c]
      new = rng.choice(pool)
      if new == cur[c]:
        continue
      prop = dict(cur)
      prop[c] = new
      if rng.random() < 0.3:  # Model move: the model's other calls follow onto the same mesh.
        m = self.specs[c].model
        for o in self.calls:
          if o != c and self.specs[o].model == m:
            prop[o] = new if new in self.secs[o] else (self._best_on(o, new.device_mesh) or prop[o])
      r = self.evaluate(prop)
      d = r.time - cur_r.time
      if d <= 0 or math.isnan(d) or (math.isfinite(r.time) and rng.random() < math.exp(-d / temp)):
        cur, cur_r = prop, r
        if r.time < best[1].time:
          best = (dict(prop), r)
    return best

  def search(self, *, exhaustive_limit: int = 20000, steps: int = 20000, time_budget_s: float = 60.0,
             seed: int = 0) -> SearchResult:
    t0 = time.perf_counter()
    base = self.baselines()
    if self.space_size <= exhaustive_limit:
      lays, _ = self.exhaustive()
      method = "exhaustive"
    else:
      starts = [p.layouts for p, _ in sorted(base.values(), key=lambda pr: pr[1].time)]
      start = starts[0] if starts else {c: self.cands[c][0] for c in self.calls}
      lays, _ = self.mcmc(start, steps=steps, time_budget_s=time_budget_s, seed=seed)
      method = "mcmc"
    for p, r in base.values():  # Never report a plan worse than a baseline.
      if r.time < self.evaluate(lays).time:
        lays = dict(p.layouts)
    result = self.evaluate(lays, record=True)
    base = {k: (p, self.evaluate(p.layouts, record=True, offload=p.offload)) for k, (p, _) in base.items()}
    return SearchResult(self.plan_of(lays, result, f"search-{method}"), result, base, method, self.evaluated,
                        time.perf_counter() - t0, self.space_size)

"""Searched plan vs heuristic plans, measured: PPO iterations through the runtime's engine (issue 7 item 7).

  PYTHONPATH=$PWD python bench/plans.py --settings 1.3b:1024,1.3b:512,1.3b:128 --iters 2 --budget 400 \
      --profile search/profiles/h100_sxm_bench.json --out bench/results/plans-h100.json   # 4 GPUs
  PYTHONPATH=$PWD python bench/plans.py --smoke                              # 4 of 8 fake CPU devices

For each setting (models, generation length; `configs/ppo_bench.py` describes them):

1. plan: the search `Planner` (analytic estimator, the graph unrolled 3 iterations, as
   `plan=search` in `real_jax.train` does) on this machine's device count (`--devices`) with the
   hardware profile `--profile`; it scores the heuristic baselines (colocated on all devices with the
   predicted-best single strategy, disaggregated) and searches (MCMC, `--search-steps`, seeded);
2. run: for the searched plan, then every baseline (and with `--colocated all` or a list, more
   colocated strategies), build the models in the plan's home layouts and run real PPO iterations
   through `real_jax.runtime.Engine` with `PPOProgram` (the engine and program `run()` builds), on
   random prompts of exactly `prompt` tokens, sampling with no EOS (every response is `gen` tokens),
   models with pseudo-random weights (`synthetic_params`) including the reward model: `--warmup`
   iterations (compiles), then `--iters` timed ones;
3. record: `measured_s` = median wall time of a timed iteration (prompts put on the devices,
   `Engine.run_iteration`, which returns when every call's outputs are ready, and the program's
   host-side metrics, as in `run()`), `predicted_s` = the simulator's iteration time (makespan / 3 of
   3 unrolled iterations), `predicted_1iter_s` = one simulated iteration alone (the engine
   synchronises at each iteration's end; the 3-iteration simulation may overlap iteration i's
   last calls with iteration i+1's first on disjoint meshes), and per call and per reallocation the
   predicted seconds beside the measured ones from the engine timeline.

Per-call measured times: the engine records each call's dispatch time and the time its outputs
were ready. A call's `measured_s` is `end - ready`, where `ready` is the latest of its dispatch, its
data parents' ends, and the ends of the records dispatched before it on overlapping devices (one
compute stream per device runs them in order): the call's own execution time. `measured_wall_s`
is end - dispatch. Medians over the timed iterations.

A plan identical to one already run (same layouts and offload) is not run again: its record copies
the measurement and names the other in `identical_to`. The JSON (`--out`) is rewritten after every
plan run; `--budget` (seconds since start) stops starting new plan runs (they are recorded as
skipped). `--fit-profile PATH` writes the profile with per-kind `time` calibration factors fitted
to the measured calls (geometric mean of measured / predicted per call kind, on top of the
profile's own factors), for planning a later run with `--profile PATH`. `--merge EARLIER.json` keeps
the earlier file's other settings in `--out` (one results file over several GPU calls), and a plan of
a setting run now that this call does not run (`--only`, budget) keeps its earlier measurement when
its layouts are the same (`merged_from` names that run): a long setting's plans measured one per call.
A setting is named MODELS:GEN, with :bBATCH when `--batch` is not the models' default.

`--plan-only` runs nothing: it plans every setting at each of `--batches` and prints (with `--out`, writes)
the searched and heuristic plans' predicted times, to choose what to measure (on CPU for GPUs: `--platform
gpu --devices 4`; `bench/results/plans-h200x4-predicted.json` is such a sweep).

Compiled programs persist in `--cache-dir` (default `.jax_cache/` in the repository, ignored by
git), so a second run on the same machine does not recompile.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_SETTINGS = "tiny:8"

if __name__ == "__main__" and "--smoke" in sys.argv:  # Before JAX starts: 8 fake CPU devices.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from real_jax.dataflow import Graph  # noqa: E402
from real_jax.experiment import Experiment, experiment_from_config  # noqa: E402
from real_jax.generation import SamplingConfig  # noqa: E402
from real_jax.models import abstract_model, param_count  # noqa: E402
from real_jax.plan_inputs import PROMPT_BUCKET, call_specs  # noqa: E402
from real_jax.runtime.engine import (Engine, ModelSlot, check_plan, dump_stacks_on_signal, home_layouts,  # noqa: E402
                                     reallocate_state)
from real_jax.runtime.loop import check_plan_for  # noqa: E402
from real_jax.runtime.registry import get_program  # noqa: E402
from real_jax.train_step import init_train_state  # noqa: E402
from search.calibrate import Case  # noqa: E402
from search.estimator import Estimator  # noqa: E402
from search.plan import ExecutionPlan, layout_to_text  # noqa: E402
from search.profile import Profile  # noqa: E402
from search.search import Planner  # noqa: E402
from search.simulate import SimResult, simulate  # noqa: E402
from search.space import ReallocPricer  # noqa: E402
from sharding import DeviceMesh, activation_sharding, shardings_for, strategies  # noqa: E402

from bench._common import header  # noqa: E402  (the repository root is on PYTHONPATH, as for every bench)

GiB = 2**30


def bench_config():
  """configs/ppo_bench.py as a module (loaded by path: configs/ is not a package)."""
  path = os.path.join(REPO, "configs", "ppo_bench.py")
  spec = importlib.util.spec_from_file_location("_ppo_bench_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def parse_settings(text: str) -> list[tuple[str, int]]:
  """'1.3b:128,7b:512' -> [('1.3b', 128), ('7b', 512)]."""
  models = bench_config().MODELS
  out = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, sep, gen = item.partition(":")
    if not sep or not gen.isdigit() or int(gen) < 1:
      raise ValueError(f"--settings item {item!r}: expected MODELS:GEN_TOKENS, e.g. 1.3b:512")
    if name not in models:
      raise ValueError(f"--settings item {item!r}: models {name!r} not in {sorted(models)} (configs/ppo_bench.py)")
    out.append((name, int(gen)))
  if not out:
    raise ValueError(f"--settings {text!r} names no setting")
  return out


def make_experiment(models: str, gen: int, *, batch: int | None = None, prompt: int | None = None) -> Experiment:
  return experiment_from_config(bench_config().experiment_dict(models, gen, batch=batch, prompt=prompt))


def setting_name(models: str, gen: int, batch: int | None = None) -> str:
  """A setting's name in the results: MODELS:GEN, with :bBATCH when `batch` is not the models' default
  (7b7b:1024 at its default 64 prompts, 7b7b:1024:b256 at 256), so runs at several batch sizes stay apart."""
  if batch is None or batch == bench_config().MODELS[models][2]:
    return f"{models}:{gen}"
  return f"{models}:{gen}:b{batch}"


def split_setting_name(name: str) -> tuple[str, int]:
  """(models, gen) of a setting name (`setting_name`); the batch is the setting's own `batch` field."""
  models, gen = name.split(":")[:2]
  return models, int(gen)


# -- planning ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Candidate:
  """A plan to run: its name in the results, the plan, and its simulations (3 iterations, 1 alone)."""

  name: str
  plan: ExecutionPlan
  sim: SimResult
  sim1: SimResult
  heuristic: bool
  terms: dict = dataclasses.field(default_factory=dict)


def plan_key(plan: ExecutionPlan) -> tuple:
  return tuple(sorted((c, str(l)) for c, l in plan.layouts.items())), tuple(sorted(plan.offload))


def colocated_plans(planner: Planner, which: str) -> list[tuple[str, dict]]:
  """Colocated plans (every call on all devices, one (data, fsdp, tensor), each call's predicted-best
  micro-batch count) for `which`: "all" strategies or a comma list such as "d1f4t1,d2f1t2" (run in
  that order)."""
  whole = DeviceMesh(0, planner.n)
  order = [s.strip() for s in which.split(",") if s.strip()]
  wanted = None if which == "all" else set(order)
  out = []
  for st in strategies(planner.n):
    name = f"d{st.data}f{st.fsdp}t{st.tensor}"
    if wanted is not None and name not in wanted:
      continue
    lays = {}
    for c in planner.calls:
      opts = [l for l in planner.cands[c] if l.device_mesh == whole and l.strategy.shape == st.shape]
      if not opts:
        break
      lays[c] = min(opts, key=lambda l: planner.secs[c][l])
    else:
      out.append((f"colocated-{name}", lays))
  if wanted is not None:
    out.sort(key=lambda item: order.index(item[0].removeprefix("colocated-")))
    unknown = wanted - {n.removeprefix("colocated-") for n, _ in out}
    if unknown:
      raise ValueError(f"--colocated {which!r}: no valid colocated plan for {sorted(unknown)} on {planner.n} devices "
                       f"(valid: {[f'd{s.data}f{s.fsdp}t{s.tensor}' for s in strategies(planner.n)]})")
  return out


def plan_setting(exp: Experiment, num_devices: int, profile: Profile, *, steps: int = 20000,
                 search_s: float = 60.0, seed: int = 0, colocated: str = "best", log=print,
                 platform: str | None = None):
  """(search info, candidates in run order, planner, graph): searched first, then the baselines.
  platform: whose kernels the specs describe (default: this machine's; "gpu" to plan for GPUs on CPU)."""
  graph, specs = call_specs(exp, lowerable=False, platform=platform)
  t0 = time.perf_counter()
  planner = Planner(specs, graph.unroll(3), Estimator(profile, mode="analytic"), num_devices)
  res = planner.search(steps=steps, time_budget_s=search_s, seed=seed)
  elapsed = time.perf_counter() - t0
  one = graph.unroll(1)

  def sim1(plan):
    lays = plan.layouts
    return simulate(one, planner.specs, lays, {c: planner.secs[c][lays[c]] for c in planner.calls},
                    {c: planner.costs[c][lays[c]] for c in planner.calls}, profile, num_devices, planner.realloc,
                    offload=plan.offload, record=True)

  cands = [Candidate("searched", res.plan, res.result, sim1(res.plan), False)]
  for _, (p, r) in sorted(res.baselines.items(), key=lambda kv: kv[1][1].time):
    cands.append(Candidate(p.name, p, r, sim1(p), True))
  if colocated != "best":
    for name, lays in colocated_plans(planner, colocated):
      if all(c.name != name for c in cands):
        r = planner.evaluate(lays, record=True)
        p = planner.plan_of(lays, r, name)
        cands.append(Candidate(name, p, r, sim1(p), True))
  for c in cands:
    c.terms = call_terms(planner, c.plan.layouts)
  info = {"method": res.method, "plans_simulated": res.evaluated, "search_s": elapsed, "space_size": res.space_size,
          "baselines_not_produced": [k for k in ("colocated", "disaggregated") if k not in res.baselines]}
  log(f"planned in {elapsed:.1f} s ({res.method}, {res.evaluated} plans): " +
      ", ".join(f"{c.name} {c.sim.time:.3f} s" for c in cands))
  return info, cands, planner, graph


def call_terms(planner: Planner, layouts: dict) -> dict[str, dict]:
  """Per call of a plan, the estimate by term (seconds per iteration: the kind's `time` factor and the
  call's repeats applied; `CallCost.parts`) and the counts behind it (per device, all repeats)."""
  out = {}
  prof = planner.profile
  for c, lay in layouts.items():
    spec, cost = planner.specs[c], planner.costs[c][lay]
    scale = spec.repeats * prof.factor(spec.kind, "time")
    terms = {k: v * scale for k, v in cost.parts(prof, spec.shape.n_layers).items()}
    out[c] = {"layout": layout_to_text(lay), "terms_s": terms, "flops": cost.flops * spec.repeats,
              "hbm_bytes": cost.hbm_bytes * spec.repeats,
              "comm_bytes": (cost.comm_intra + cost.comm_inter) * spec.repeats,
              "collectives": (cost.colls_intra + cost.colls_inter) * spec.repeats, "tier": cost.tier,
              "decode_kv_slots": spec.decode_kv_slots, "fused_attention": spec.fused_attention}
  return out


def predicted_parts(sim1: SimResult) -> tuple[dict, dict]:
  """(call -> seconds, model -> realloc seconds) of one simulated iteration."""
  calls, reallocs = {}, {}
  for e in sim1.events:
    if e.kind == "call":
      calls[e.name] = e.t1 - e.t0
    else:
      reallocs[e.name] = reallocs.get(e.name, 0.0) + e.t1 - e.t0
  return calls, reallocs


# -- running a plan through the engine -----------------------------------------------------------


def synthetic_params(cfg, head: str, layout, seed: int):
  """(graphdef, params) of a model with pseudo-random weights made on the devices in `layout`.

  Every matrix gets a deterministic hash fill, uniform with the std of the model's own init (0.02),
  norm scales 1 and biases 0: one cheap program per model (iota, sin) instead of `create_model`'s
  random init, whose threefry program takes ~15 s to compile per model on CPU. Throughput does not
  depend on the values (sampling runs every token; no EOS).
  """
  graphdef, abstract = nnx.split(abstract_model(cfg, head=head))
  shardings = shardings_for(abstract, layout)
  paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  amp = 0.02 * math.sqrt(3.0)

  def fill():
    out = []
    for j, (path, leaf) in enumerate(paths):
      name = jax.tree_util.keystr(path)
      shape, dtype = tuple(leaf.shape), leaf.dtype
      if "norm" in name:
        out.append(jnp.ones(shape, dtype))
      elif name.startswith("['layers']['b"):  # q/k/v biases (Qwen2 shapes)
        out.append(jnp.zeros(shape, dtype))
      else:
        x = jnp.full(shape, 0.7548776662 * (seed + 1) + 0.5698402910 * (j + 1), jnp.float32)
        for ax, mul in zip(range(len(shape)), (12.9898, 78.233, 37.719, 4.1414)):
          x = x + jax.lax.broadcasted_iota(jnp.float32, shape, ax) * mul
        u = jnp.sin(x) * 43758.5453
        u = u - jnp.floor(u)  # ~uniform in [0, 1)
        out.append((amp * (2.0 * u - 1.0)).astype(dtype))
    return jax.tree.unflatten(treedef, out)

  return graphdef, jax.jit(fill, out_shardings=shardings)()


class ModelPool:
  """Each role's parameters, kept across plan runs: created once (`synthetic_params`, in the home
  layout of the first plan that needs them) and then moved device to device (`reallocate`, donated)
  into each later plan's home layouts, so a model's init compiles once per process, not once per plan.

  A run that fails (e.g. out of memory) may leave donated (deleted) arrays, or arrays that carry the
  failure: PJRT passes a failed program's error on to every program that reads its outputs (on 4x
  H200 the colocated plan run after a searched plan's out-of-memory train step failed at once with the
  same 44.14 GiB allocation error). So the runner `clear`s the pool after a failed run.
  """

  def __init__(self):
    self._items: dict[str, tuple] = {}  # role -> (model key, graphdef, params)

  @staticmethod
  def _key(exp: Experiment, role: str) -> tuple:
    spec = exp.models[role]
    return spec.model_config(), spec.head, spec.seed

  def take(self, exp: Experiment, role: str, layout) -> tuple:
    """(graphdef, params in `layout`); the pool no longer holds them."""
    key = self._key(exp, role)
    item = self._items.pop(role, None)
    if item is not None and item[0] == key and not any(x.is_deleted() for x in jax.tree.leaves(item[2])):
      return item[1], reallocate_state(item[2], layout, donate=True)
    del item
    spec = exp.models[role]
    return synthetic_params(spec.model_config(), spec.head, layout, spec.seed)

  def clear(self) -> None:
    self._items.clear()

  def give(self, exp: Experiment, role: str, graphdef, params) -> None:
    if not any(x.is_deleted() for x in jax.tree.leaves(params)):
      self._items[role] = (self._key(exp, role), graphdef, params)


def build(exp: Experiment, plan: ExecutionPlan, pool: ModelPool):
  """(engine, program, graph, placement) for `plan`, as `real_jax.runtime.loop.run` builds them, with
  sampling that never stops early (no EOS), models from `pool`, and no tokenizer, data set,
  checkpoints or metric files."""
  program_cls = get_program(exp.algorithm)
  graph = program_cls.graph(exp)
  names = [c.name for c in graph.calls]
  plan.check_covers(names)
  check_plan_for(program_cls, exp, graph, plan)
  check_plan(graph, plan, {r: nnx.state(abstract_model(exp.models[r].model_config(), head=exp.models[r].head))
                           for r in graph.models})
  homes = home_layouts(graph, plan)
  trained = graph.trained_models()
  slots = {}
  for role in graph.models:
    graphdef, params = pool.take(exp, role, homes[role])
    slots[role] = ModelSlot(role, graphdef, params, homes[role])
    if role in trained:
      slots[role].train_state = init_train_state(nnx.merge(graphdef, params), exp.optim[role], homes[role])
      slots[role].params = slots[role].train_state.params
  s = exp.sampling
  sampling = SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                            n=s.n_samples, eos_id=None, pad_id=0, bucket=PROMPT_BUCKET)
  program = program_cls(exp, {r: sl.graphdef for r, sl in slots.items()}, sampling, None)
  engine = Engine(graph, plan, slots, program.functions())
  placement = {k: plan[next(n for n in graph.order if k in graph[n].inputs)] for k in graph.external}
  return engine, program, graph, placement


def give_back(exp: Experiment, pool: ModelPool, engine: Engine) -> None:
  """Returns every model's current parameters (home layout) to the pool; optimizer states are dropped."""
  for role, slot in engine.slots.items():
    params = slot.train_state.params if slot.train_state is not None else slot.params
    slot._copies.clear()
    pool.give(exp, role, slot.graphdef, params)
    slot.params = slot.train_state = None


def prompts(exp: Experiment, iteration: int) -> dict[str, np.ndarray]:
  """Random prompts of exactly max_prompt_len tokens (no padding), fresh each iteration."""
  vocab = min(exp.models[r].model_config().vocab_size for r in exp.models)
  rng = np.random.default_rng([exp.seed, iteration])
  b, p = exp.data.batch_size, exp.data.max_prompt_len
  return {"prompts": rng.integers(1, vocab, (b, p), dtype=np.int32), "prompt_mask": np.ones((b, p), bool)}


def iteration(engine: Engine, program, placement, arrays) -> tuple[float, dict, float]:
  """One PPO iteration as `run()` does it: (wall seconds, metrics, engine clock at its start)."""
  t_start = engine.now()
  t0 = time.perf_counter()
  inputs = {k: jax.device_put(v, activation_sharding(placement[k], ("batch",) + (None,) * (v.ndim - 1), v.shape))
            for k, v in arrays.items()}
  data = engine.run_iteration(inputs)
  metrics = program.end_iteration(data)
  jax.block_until_ready(data)  # Already ready (run_iteration waits for every call); kept explicit.
  return time.perf_counter() - t0, metrics, t_start


def busy_times(graph: Graph, recs: list[dict]) -> list[float]:
  """Per timeline record (dispatch order): its own execution time (module docstring)."""
  out, seen, ends = [], [], {}
  for r in recs:
    s, n = r["devices"]
    ready = r["start"]
    for (qs, qn), q_end in seen:
      if qs < s + n and s < qs + qn:
        ready = max(ready, q_end)
    if r["kind"] == "call":
      for p in graph.parents(r["name"]):
        ready = max(ready, ends.get(p, ready))
      ends[r["name"]] = r["end"]
    out.append(max(0.0, r["end"] - ready))
    seen.append(((s, n), r["end"]))
  return out


def record_key(r: dict) -> str:
  return r["name"] if r["kind"] == "call" else f"realloc:{r['name'].split(':', 1)[0]}"


def run_plan(exp: Experiment, plan: ExecutionPlan, pool: ModelPool, *, warmup: int, iters: int, log=print) -> dict:
  """Builds `plan`, runs warm-up + timed iterations; the measured part of a plan record."""
  t0 = time.perf_counter()
  engine, program, graph, placement = build(exp, plan, pool)
  try:
    build_s = time.perf_counter() - t0
    return _timed(exp, plan, engine, program, graph, placement, build_s, warmup=warmup, iters=iters, log=log)
  finally:
    give_back(exp, pool, engine)


def _timed(exp, plan, engine, program, graph, placement, build_s, *, warmup, iters, log) -> dict:
  first = None
  warm, timed, metrics = [], [], {}
  per: dict[str, list[tuple[float, float]]] = {}
  timeline = []
  for it in range(warmup + iters):
    dt, metrics, t_start = iteration(engine, program, placement, prompts(exp, it))
    recs = engine.iteration_records(engine.iteration - 1)
    if it == 0:
      first = dt
    if it < warmup:
      warm.append(dt)
      continue
    timed.append(dt)
    for r, b in zip(recs, busy_times(graph, recs)):
      per.setdefault(record_key(r), []).append((b, r["end"] - r["start"]))
    timeline = [{"name": r["name"], "kind": r["kind"], "devices": list(r["devices"]),
                 "t0": r["start"] - t_start, "t1": r["end"] - t_start, "bytes": r["bytes"]} for r in recs]
  log(f"  {plan.name}: build {build_s:.1f} s, first iteration {first:.2f} s, timed " +
      ", ".join(f"{t:.3f}" for t in timed))
  parts = {k: {"measured_s": statistics.median(b for b, _ in v), "measured_wall_s": statistics.median(w for _, w in v)}
           for k, v in per.items()}
  out = {"measured_s": statistics.median(timed) if timed else None, "iteration_s": timed, "warmup_s": warm,
         "first_iteration_s": first, "build_s": build_s, "parts": parts, "timeline": timeline,
         "metrics": {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0},
         "finite": all(math.isfinite(float(v)) for v in metrics.values() if np.ndim(v) == 0)}
  out["memory"] = memory_stats()
  return out


def memory_stats() -> dict | None:
  """Peak / in-use bytes per device where the backend reports them (GPU; the peak is a running max)."""
  peaks, used = [], []
  for d in jax.local_devices():
    try:
      st = d.memory_stats() or {}
    except Exception:  # noqa: BLE001  (backends without memory stats raise different errors)
      return None
    if "peak_bytes_in_use" not in st:
      return None
    peaks.append(st["peak_bytes_in_use"] / GiB)
    used.append(st.get("bytes_in_use", 0) / GiB)
  return {"peak_gib_process_max": peaks, "in_use_gib": used}


# -- the benchmark -------------------------------------------------------------------------------


def plan_record(c: Candidate) -> dict:
  calls, reallocs = predicted_parts(c.sim1)
  return {"name": c.name, "plan_name": c.plan.name, "heuristic": c.heuristic, "plan": c.plan.to_text(),
          "predicted_s": c.sim.time, "predicted_1iter_s": c.sim1.time,
          "predicted_realloc_s": c.sim1.realloc_seconds,
          "predicted_peak_gib": float(c.sim.peak_memory.max()) / GiB, "predicted_calls_s": calls,
          "predicted_reallocs_s": reallocs, "predicted_call_terms": c.terms,
          "predicted_timeline": [{"name": e.name, "kind": e.kind, "devices": [e.device_start, e.device_size],
                                  "devices2": [e.device_start2, e.device_size2], "t0": e.t0, "t1": e.t1}
                                 for e in c.sim1.events],
          "identical_to": [], "status": "pending", "measured_s": None}


def attach(rec: dict, meas: dict, tokens: int) -> None:
  """Puts a run's measurements into a plan record, with per-call measured vs predicted; `tokens`:
  prompt + response tokens of an iteration (for tokens_per_s)."""
  parts = meas.pop("parts")
  rec.update(meas)
  rec["status"] = "ok"
  pred = rec["predicted_s"]
  rec["measured_over_predicted"] = rec["measured_s"] / pred if pred and math.isfinite(pred) else None
  rec["tokens_per_s"] = tokens / rec["measured_s"]
  rec["calls"] = {}
  for name, pred in rec["predicted_calls_s"].items():
    m = parts.get(name, {})
    rec["calls"][name] = {"predicted_s": pred, **m,
                          "measured_over_predicted": m["measured_s"] / pred if m and pred else None}
  rec["reallocs"] = {}
  models = {k.split(":", 1)[1] for k in parts if k.startswith("realloc:")} | set(rec["predicted_reallocs_s"])
  for model in sorted(models):
    m = parts.get(f"realloc:{model}", {})
    rec["reallocs"][model] = {"predicted_s": rec["predicted_reallocs_s"].get(model, 0.0), **m}


def summarise(setting: dict) -> None:
  plans = [p for p in setting["plans"] if p["status"] == "ok"]
  searched = next((p for p in plans if p["name"] == "searched"), None)
  heur = [p for p in plans if p["heuristic"]]
  s = {}
  if heur:
    best = min(heur, key=lambda p: p["measured_s"])
    s.update(best_heuristic=best["name"], best_heuristic_measured_s=best["measured_s"])
    # A heuristic run although predicted infeasible (--run-infeasible) has no finite prediction: inf in
    # this run, None once written and merged back (--merge).
    feasible = [p for p in heur if _finite(p["predicted_s"]) is not None]
    pbest = min(feasible, key=lambda p: p["predicted_s"]) if feasible else None
    s.update(best_predicted_heuristic=pbest and pbest["name"])
    if searched:
      s["speedup_measured"] = best["measured_s"] / searched["measured_s"]
      if pbest and _finite(searched["predicted_s"]) is not None:
        s["speedup_predicted"] = pbest["predicted_s"] / searched["predicted_s"]
  if searched:
    s["searched_measured_s"] = searched["measured_s"]
    s["searched_identical_to"] = searched["identical_to"]
  errs = [abs(p["measured_over_predicted"] - 1) for p in plans if p.get("measured_over_predicted")]
  if errs:
    s["max_prediction_error"] = max(errs)
  setting["summary"] = s


def fit_profile(profile: Profile, settings: list[dict]) -> tuple[Profile, dict]:
  """The profile with per-kind `time` factors multiplied by the geometric mean of measured / predicted
  over every measured call of that kind; also returns the factors and call counts."""
  kinds = {"actor_gen": "generate", "reward_inf": "inference", "ref_inf": "inference", "critic_inf": "inference",
           "actor_train": "train_step", "critic_train": "train_step"}
  ratios: dict[str, list[float]] = {}
  for st in settings:
    for p in st["plans"]:
      if p["status"] != "ok" or p.get("measured_in"):
        continue
      for name, c in p.get("calls", {}).items():
        if c.get("measured_over_predicted") and name in kinds:
          ratios.setdefault(kinds[name], []).append(c["measured_over_predicted"])
  cal = {k: dict(v) for k, v in profile.calibration.items()}
  fitted = {}
  for kind, r in ratios.items():
    f = math.exp(sum(math.log(x) for x in r) / len(r))
    cal.setdefault(kind, {})["time"] = profile.factor(kind, "time") * f
    fitted[kind] = {"factor": f, "calls": len(r), "spread": [min(r), max(r)]}
  note = (f" time factors fitted by bench/plans.py to {sum(len(r) for r in ratios.values())} measured calls on "
          f"{header()['device_kind']} (jax {jax.__version__}).")
  return dataclasses.replace(profile, calibration=cal, notes=profile.notes + note), fitted


def repredict(doc: dict, profile: Profile, *, log=print) -> dict:
  """Every measured plan of a results document (`doc`, as `run_bench` writes it) predicted again under
  `profile`, with its layouts as run (no search): per plan and per call, measured / predicted under
  `profile` next to measured / predicted at run time. Checks a changed estimator or profile against
  GPU runs on a machine without GPUs; the plans the new profile would choose are not measured here.
  Memory is checked against the allocator limit the runs had (`profile_memory_bytes`, where recorded);
  a plan the profile finds infeasible is reported with the reason and left out of the error counts."""
  platform = "gpu" if doc.get("card", "gpu") != "cpu" else "cpu"
  if doc.get("profile_memory_bytes"):
    profile = profile.replace(memory_bytes=float(doc["profile_memory_bytes"]))
  est = Estimator(profile, mode="analytic", cache_dir="")
  out = {"profile": profile.name, "predicted_on": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
         "source": {k: doc.get(k) for k in ("card", "jax", "date", "profile")}, "settings": []}
  for st in doc["settings"]:
    models, gen = split_setting_name(st["name"])
    exp = make_experiment(models, gen, batch=st.get("batch"), prompt=st.get("prompt_len"))
    graph, specs = call_specs(exp, lowerable=False, platform=platform)
    n = int(st.get("devices") or doc.get("devices_used") or doc["devices"])
    pricer = ReallocPricer(specs, profile)
    rows = []
    for p in st["plans"]:
      if p.get("status") != "ok" or not p.get("measured_s") or p.get("measured_in"):
        continue  # Not run, failed, or a copy of another plan's measurement.
      plan = ExecutionPlan.parse(p["plan"])
      lays = plan.layouts
      costs = {c: est.cost(specs[c], lays[c]) for c in lays}
      secs = {c: est.seconds(specs[c], lays[c]) for c in lays}
      sim = simulate(graph.unroll(3), specs, lays, secs, costs, profile, n, pricer, offload=plan.offload)
      sim1 = simulate(graph.unroll(1), specs, lays, secs, costs, profile, n, pricer, offload=plan.offload,
                      record=True)
      then = p["measured_s"] / p["predicted_s"] if p.get("predicted_s") else None
      if not sim.feasible:
        rows.append({"plan": p["name"], "measured_s": p["measured_s"], "predicted_s": None,
                     "infeasible": sim.reason, "measured_over_predicted_then": then, "calls": {}})
        log(f"{st['name']:<10} {p['name']:<18} infeasible under {profile.name}: {sim.reason}")
        continue
      calls, _ = predicted_parts(sim1)
      row = {"plan": p["name"], "measured_s": p["measured_s"], "predicted_s": sim.time,
             "measured_over_predicted": p["measured_s"] / sim.time, "measured_over_predicted_then": then,
             "calls": {}}
      for c, pred in calls.items():
        m = (p.get("calls") or {}).get(c, {})
        if m.get("measured_s"):
          row["calls"][c] = {"layout": layout_to_text(lays[c]), "measured_s": m["measured_s"], "predicted_s": pred,
                             "measured_over_predicted": m["measured_s"] / pred,
                             "measured_over_predicted_then": m.get("measured_over_predicted")}
      rows.append(row)
      log(f"{st['name']:<10} {p['name']:<18} measured {p['measured_s']:.3f}  predicted {sim.time:.3f}: "
          f"measured / predicted {row['measured_over_predicted']:.3f} (then "
          f"{'-' if then is None else f'{then:.3f}'})")
    out["settings"].append({"name": st["name"], "plans": rows})
  ratios = [r["measured_over_predicted"] for st in out["settings"] for r in st["plans"] if r["predicted_s"]]
  then = [r["measured_over_predicted_then"] for st in out["settings"] for r in st["plans"]
          if r["measured_over_predicted_then"]]
  calls = [c["measured_over_predicted"] for st in out["settings"] for r in st["plans"] for c in r["calls"].values()]
  calls_then = [c["measured_over_predicted_then"] for st in out["settings"] for r in st["plans"]
                for c in r["calls"].values() if c["measured_over_predicted_then"]]

  def spread(xs):
    return {"n": len(xs), "max_abs_err": max(abs(x - 1) for x in xs) if xs else None,
            "within_15pct": sum(abs(x - 1) <= 0.15 for x in xs),
            "geomean_abs_log": math.exp(sum(abs(math.log(x)) for x in xs) / len(xs)) if xs else None}

  out["summary"] = {"plans": spread(ratios), "plans_then": spread(then), "calls": spread(calls),
                    "calls_then": spread(calls_then)}
  log(f"plans within 15%: {out['summary']['plans']['within_15pct']} of {len(ratios)} (then "
      f"{out['summary']['plans_then']['within_15pct']}); calls within 15%: {out['summary']['calls']['within_15pct']} "
      f"of {len(calls)} (then {out['summary']['calls_then']['within_15pct']} of {len(calls_then)})")
  return out


def call_records(doc: dict, names: set[str] | None = None, kinds: tuple[str, ...] = ("train_step",),
                 source: str = "") -> list[dict]:
  """The measured calls of `kinds` in a results document (`run_bench`), as calibration records
  (`search.calibrate`: one step, the call's own measured seconds / its repeats) for `python -m search.profile
  --refit P --add-records`: in-plan measurements of layouts no standalone case timed. Settings in `names`
  only (default all); a plan copied from another (`measured_in`) and micro-batched layouts (a case has
  no micro-batches) are left out."""
  platform = "gpu" if doc.get("card", "gpu") != "cpu" else "cpu"
  out = []
  for st in doc["settings"]:
    if names is not None and st["name"] not in names:
      continue
    models, gen = split_setting_name(st["name"])
    exp = make_experiment(models, gen, batch=st.get("batch"), prompt=st.get("prompt_len"))
    _, specs = call_specs(exp, lowerable=False, platform=platform)
    for p in st["plans"]:
      if p.get("status") != "ok" or p.get("measured_in"):
        continue
      lays = ExecutionPlan.parse(p["plan"]).layouts
      for c, m in p.get("calls", {}).items():
        spec, lay = specs[c], lays[c]
        if spec.kind not in kinds or not m.get("measured_s") or lay.strategy.micro_batches != 1:
          continue
        case = Case(exp.models[spec.model].preset, spec.kind, spec.head, layout_to_text(lay), spec.batch,
                    seq_len=spec.seq_len, prompt_len=spec.prompt_len, new_tokens=spec.new_tokens,
                    remat=exp.models[spec.model].model_config().remat if spec.kind == "train_step" else "")
        out.append({"name": case.name, **dataclasses.asdict(case), "shape": dataclasses.asdict(spec.shape),
                    "fused_attention": spec.fused_attention, "decode_kv_slots": spec.decode_kv_slots,
                    "measured_s": m["measured_s"] / spec.repeats, "repeats_in_plan": spec.repeats,
                    "source": f"{source} {st['name']} {p['name']} {c}".strip(),
                    "run": p.get("merged_from") or st.get("run")})
  return out


def plan_only(settings: list[tuple[str, int]], batches: list[int | None], profile: Profile, *, devices: int,
              search_s: float, seed: int, platform: str | None, log=print) -> dict:
  """Runs nothing: per setting and batch, the searched plan's and the heuristics' predicted iteration
  times (`plan_setting`; with platform "gpu", GPU kernels priced from a CPU machine). For choosing what to
  measure next; these are predictions, not results."""
  rows = []
  for models, gen in settings:
    for batch in batches:
      exp = make_experiment(models, gen, batch=batch)
      info, cands, _, _ = plan_setting(exp, devices, profile, search_s=search_s, seed=seed, platform=platform,
                                       log=lambda m: None)
      heur = {c.name: c.sim.time for c in cands[1:]}
      best = min(heur.values(), default=math.inf)
      row = {"models": models, "gen": gen, "batch": exp.data.batch_size, "searched_s": cands[0].sim.time,
             "searched_plan": {c: layout_to_text(lay) for c, lay in cands[0].plan.layouts.items()},
             **({"searched_offload": sorted(cands[0].plan.offload)} if cands[0].plan.offload else {}),
             "heuristics_offload": {c.name: sorted(c.plan.offload) for c in cands[1:] if c.plan.offload},
             "heuristics_s": heur, "speedup_predicted": best / cands[0].sim.time, "search": info}
      rows.append(row)
      log(f"{models:6s} gen {gen:5d} batch {exp.data.batch_size:4d}: searched {row['searched_s']:.3f} s, best heuristic "
          f"{best:.3f} s ({min(heur, key=heur.get) if heur else '-'}), predicted {row['speedup_predicted']:.2f}x")
  return {"profile": profile.name, "devices": devices, "platform": platform or jax.devices()[0].platform,
          "planned_on": jax.devices()[0].device_kind, "jax": jax.__version__,
          "date": time.strftime("%Y-%m-%d", time.gmtime()), "predicted_only": True, "settings": rows}


def _finite(x):
  """JSON-safe: non-finite floats (an infeasible plan's inf) become None; NumPy scalars become floats."""
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(x) else None
  return x


def write_json(path: str, doc: dict) -> None:
  """Writes `doc` atomically (a reader never sees half a file), strict JSON."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(_finite(doc), f, indent=1, allow_nan=False, default=float)
  os.replace(tmp, path)


def keep_earlier(setting: dict, earlier: dict | None, *, log=print) -> None:
  """Plans of `setting` not run now (--only, budget) take the measurement of the same plan (same name,
  same layouts) from the earlier results of this setting (--merge), marked `merged_from` with that run's
  card, jax and date: one setting's plans measured over several GPU calls. A plan whose layouts differ
  from the earlier record's (a search that chose differently) keeps its skipped status."""
  if not earlier:
    return
  before = {p["name"]: p for p in earlier.get("plans", []) if isinstance(p, dict)}
  for i, rec in enumerate(setting["plans"]):
    old = before.get(rec["name"])
    if not rec["status"].startswith("skipped") or not old or old.get("status") != "ok" or old.get("measured_in"):
      continue
    if old.get("plan") != rec["plan"]:
      log(f"  {rec['name']}: not merged (the earlier run measured {old.get('plan')}, this run plans {rec['plan']})")
      continue
    setting["plans"][i] = {**old, "identical_to": rec["identical_to"],
                           "merged_from": old.get("merged_from") or earlier.get("run")}


def run_bench(settings: list[tuple[str, int]], *, out: str, profile: Profile, devices: int | None = None,
              warmup: int = 1, iters: int = 3, budget: float = math.inf, batch: int | None = None,
              prompt: int | None = None, colocated: str = "best", only: tuple[str, ...] = (),
              search_steps: int = 20000, search_s: float = 60.0, seed: int = 0, log=print,
              t_start: float | None = None, run_infeasible: bool = False,
              merge: dict | None = None) -> dict:
  """Plans and runs every setting; rewrites `out` after every plan run; returns the document.

  merge: an earlier results document whose settings (other than those run now) are kept, first.
  run_infeasible: run plans the simulator says run out of memory too (recorded with `predicted_infeasible`),
  to test the memory model where it is the only reason a heuristic is not the baseline.
  """
  t_start = time.perf_counter() if t_start is None else t_start
  if iters < 1 or warmup < 0:
    raise ValueError(f"--iters {iters} must be >= 1 and --warmup {warmup} >= 0")
  n = devices or jax.device_count()
  if n > jax.device_count():
    raise ValueError(f"--devices {n}: this machine has {jax.device_count()} devices")
  pool = ModelPool()
  doc = {**header(), "profile": profile.name, "profile_calibration": profile.calibration,
         "profile_memory_bytes": profile.memory_bytes, "devices_used": n,
         "args": {"settings": ",".join(f"{m}:{g}" for m, g in settings), "batch": batch, "warmup": warmup,
                  "iters": iters, "budget_s": budget if math.isfinite(budget) else None, "colocated": colocated,
                  "search_steps": search_steps, "seed": seed},
         "settings": []}
  names = {setting_name(m, g, batch) for m, g in settings}
  earlier = {st.get("name"): st for st in (merge or {}).get("settings", [])}
  doc["settings"] = [st for name, st in earlier.items() if name not in names]
  run_info = {k: doc[k] for k in ("card", "device_kind", "jax", "date", "profile")}
  for models, gen in settings:
    exp = make_experiment(models, gen, batch=batch, prompt=prompt)
    cfgs = {r: exp.models[r].model_config() for r in exp.models}
    setting = {"name": setting_name(models, gen, exp.data.batch_size),
               "models": {r: exp.models[r].preset for r in exp.models},
               "params": {r: param_count(cfgs[r], exp.models[r].head) for r in exp.models},
               "batch": exp.data.batch_size, "prompt_len": exp.data.max_prompt_len, "gen_len": gen,
               "ppo_epochs": exp.ppo.ppo_epochs, "mini_batches": exp.ppo.mini_batches, "devices": n,
               "run": run_info, "plans": []}
    doc["settings"].append(setting)
    if time.perf_counter() - t_start > budget:
      setting["status"] = "skipped (budget)"
      write_json(out, doc)
      continue
    log(f"== {setting['name']}: {setting['batch']} prompts x ({setting['prompt_len']} + {gen}) tokens on {n} devices")
    info, cands, _, _ = plan_setting(exp, n, profile, steps=search_steps, search_s=search_s, seed=seed,
                                     colocated=colocated, log=log)
    setting["search"] = info
    setting["plans"] = [plan_record(c) for c in cands]
    write_json(out, doc)
    local: dict[tuple, dict] = {}
    for c, rec in zip(cands, setting["plans"]):
      key = plan_key(c.plan)
      same = [r["name"] for cc, r in zip(cands, setting["plans"]) if r is not rec and plan_key(cc.plan) == key]
      rec["identical_to"] = same
      if key in local:  # Same plan in this setting: copy the measurement.
        src = local[key]
        for k in ("measured_s", "iteration_s", "warmup_s", "first_iteration_s", "build_s", "calls", "reallocs",
                  "timeline", "metrics", "finite", "memory", "status", "error", "tokens_per_s"):
          if k in src:
            rec[k] = src[k]
        rec["measured_in"] = src["name"]
        if rec["measured_s"] and math.isfinite(rec["predicted_s"]):
          rec["measured_over_predicted"] = rec["measured_s"] / rec["predicted_s"]
        continue
      if only and rec["name"] not in only:  # Not registered in `local`: an identical plan named in --only runs.
        rec["status"] = "skipped (--only)"
        continue
      local[key] = rec
      if time.perf_counter() - t_start > budget:
        rec["status"] = "skipped (budget)"
        continue
      if not c.sim.feasible:  # E.g. an extra colocated strategy that the simulator says runs out of memory.
        if not run_infeasible:
          rec["status"] = f"skipped (predicted infeasible: {c.sim.reason})"
          continue
        rec["predicted_infeasible"] = c.sim.reason
      t0 = time.perf_counter()
      try:
        attach(rec, run_plan(exp, c.plan, pool, warmup=warmup, iters=iters, log=log),
               exp.data.batch_size * (exp.data.max_prompt_len + gen))
      except Exception as e:  # noqa: BLE001  (an OOM or a failing layout is a result; the next plan runs)
        rec["status"] = "error"
        rec["error"] = f"{type(e).__name__}: {str(e)[:800]}"
        log(f"  {c.name}: {rec['error'][:300]}")
        pool.clear()  # Its models may carry the failure (ModelPool); the next plan makes fresh ones.
      rec["wall_s"] = time.perf_counter() - t0
      gc.collect()
      summarise(setting)
      write_json(out, doc)
    keep_earlier(setting, earlier.get(setting["name"]), log=log)
    summarise(setting)
    write_json(out, doc)
  doc["elapsed_s"] = time.perf_counter() - t_start
  write_json(out, doc)
  return doc


def main(argv=None) -> int:
  t_start = time.perf_counter()
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--settings", default="1.3b:1024,1.3b:512,1.3b:128",
                  help="comma list of MODELS:GEN (models: configs/ppo_bench.py MODELS)")
  ap.add_argument("--smoke", action="store_true",
                  help=f"tiny models on 4 of 8 fake CPU devices, settings {SMOKE_SETTINGS}, 1 timed iteration")
  ap.add_argument("--out", default=None, help="results JSON (default bench/results/plans-<card>.json)")
  ap.add_argument("--profile", default="h100_sxm", help="profile JSON path or name under search/profiles/")
  ap.add_argument("--devices", type=int, default=0, help="devices to plan and run on (default: all; smoke: 4)")
  ap.add_argument("--warmup", type=int, default=1, help="untimed iterations per plan (the first compiles)")
  ap.add_argument("--iters", type=int, default=3, help="timed iterations per plan")
  ap.add_argument("--budget", type=float, default=math.inf, help="seconds after which no new plan run starts")
  ap.add_argument("--batch", type=int, default=None, help="prompts per iteration (default per models)")
  ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128; tiny 16)")
  ap.add_argument("--colocated", default="best",
                  help="colocated plans to run: best (the Planner's baseline), all, or a list like d1f4t1,d1f1t4 "
                  "(run in that order, after the searched plan and the baselines)")
  ap.add_argument("--only", default="", help="comma list of plan names to run (e.g. disaggregated); the others "
                  "are planned and predicted but not run")
  ap.add_argument("--run-infeasible", action="store_true",
                  help="also run plans predicted to run out of memory (e.g. a colocated strategy named in "
                  "--colocated), to test the memory model")
  ap.add_argument("--search-steps", type=int, default=20000)
  ap.add_argument("--search-s", type=float, default=60.0, help="MCMC time limit per setting")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--cache-dir", default=os.path.join(REPO, ".jax_cache"),
                  help="persistent JAX compilation cache ('' disables)")
  ap.add_argument("--fit-profile", default=None, help="write the profile with fitted per-kind time factors here")
  ap.add_argument("--repredict", default=None, metavar="RESULTS",
                  help="run nothing: predict every measured plan of RESULTS (a plans-<card>.json) again under "
                  "--profile, layouts as run, and print measured / predicted then and now (--out: write it)")
  ap.add_argument("--call-records", default=None, metavar="RESULTS",
                  help="run nothing: write (--out) the measured train calls of RESULTS as calibration records, one "
                  "step each, for python -m search.profile --refit P --add-records (--settings-only: which settings)")
  ap.add_argument("--settings-only", default="", help="--call-records: comma list of setting names (default all)")
  ap.add_argument("--plan-only", action="store_true",
                  help="run nothing: print (and with --out write) the searched and heuristic plans' predicted times "
                  "for every setting and --batches entry, e.g. on CPU for GPUs with --platform gpu --devices 4")
  ap.add_argument("--batches", default="", help="--plan-only: comma list of prompts per iteration (default: --batch)")
  ap.add_argument("--platform", default=None, help="--plan-only: whose kernels to price (default: this machine's)")
  ap.add_argument("--merge", default=None,
                  help="an earlier results JSON: its other settings are kept in --out (one file for several calls)")
  args = ap.parse_args(argv)
  dump_stacks_on_signal()  # bench/gpu/plans.sh sends SIGUSR1 before its timeout kills a plan run that hangs.
  if args.smoke:
    if args.settings == ap.get_default("settings"):
      args.settings = SMOKE_SETTINGS
    args.devices = args.devices or min(4, jax.device_count())
    if args.iters == ap.get_default("iters"):
      args.iters = 1
  if args.cache_dir:
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  if args.repredict:
    with open(args.repredict) as f:
      doc = json.load(f)
    res = repredict(doc, Profile.load(args.profile), log=lambda m: print(m, flush=True))
    if args.out:
      write_json(args.out, res)
    return 0
  if args.call_records:
    with open(args.call_records) as f:
      doc = json.load(f)
    names = {n.strip() for n in args.settings_only.split(",") if n.strip()} or None
    recs = call_records(doc, names, source=os.path.relpath(args.call_records, REPO))
    if not recs:
      raise SystemExit(f"--call-records {args.call_records}: no measured train call in settings {names or 'any'}")
    for r in recs:
      print(f"{r['source']}: {r['name']} {r['measured_s']:.4f} s per step")
    if args.out:
      write_json(args.out, {"records": recs})
    return 0
  settings = parse_settings(args.settings)
  if args.plan_only:
    batches = [int(b) for b in args.batches.split(",") if b.strip()] or [args.batch]
    res = plan_only(settings, batches, Profile.load(args.profile), devices=args.devices or jax.device_count(),
                    search_s=args.search_s, seed=args.seed, platform=args.platform,
                    log=lambda m: print(m, flush=True))
    if args.out:
      write_json(args.out, res)
    return 0
  profile = Profile.load(args.profile).on_local_devices(log=lambda m: print(m, flush=True))
  out = args.out or os.path.join(REPO, "bench", "results",
                                 f"plans-{header()['card']}{'-smoke' if args.smoke else ''}.json")
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}, profile {profile.name}; "
        f"writing {out}", flush=True)
  merge = None
  if args.merge and os.path.exists(args.merge):
    with open(args.merge) as f:
      merge = json.load(f)
  elif args.merge:
    print(f"--merge {args.merge}: no such file; writing this run's settings only", flush=True)
  doc = run_bench(settings, out=out, profile=profile, devices=args.devices or None, warmup=args.warmup,
                  iters=args.iters, budget=args.budget, batch=args.batch, prompt=args.prompt,
                  colocated=args.colocated, only=tuple(n for n in args.only.split(",") if n),
                  search_steps=args.search_steps, search_s=args.search_s, seed=args.seed,
                  log=lambda m: print(m, flush=True), t_start=t_start, merge=merge,
                  run_infeasible=args.run_infeasible)
  ran = {setting_name(m, g, args.batch) for m, g in settings}
  for st in doc["settings"]:
    if st["name"] not in ran:
      continue  # Merged from an earlier file.
    print(f"{st['name']}: {json.dumps(st.get('summary', {}), default=float)}")
    for p in st["plans"]:
      ms, ps = p.get("measured_s"), _finite(p.get("predicted_s"))
      print(f"  {p['name']:<20} {p['status']:<8} measured {ms if ms is None else round(ms, 4)}  predicted "
            f"{'infeasible' if ps is None else f'{ps:.4f}'}  identical_to {p['identical_to']}")
  if args.fit_profile:
    fitted_profile, fitted = fit_profile(profile, [st for st in doc["settings"] if st["name"] in ran])
    write_json(args.fit_profile, fitted_profile.to_dict())
    print(f"fitted time factors {json.dumps(fitted)} -> {args.fit_profile}")
  print(f"done in {time.perf_counter() - t_start:.0f} s; wrote {out}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

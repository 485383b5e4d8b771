"""The training loop: builds models, data, plan and engine from an Experiment and runs it.

`config.algorithm` picks the program (`real_jax.runtime.registry`), which gives the graph, the call
functions and its data kind; the loop is the same for every algorithm. `run(exp, workdir)` is what
`python -m real_jax.train`, the notebooks and the tests call. It writes into `workdir`:
* `metrics.jsonl` and TensorBoard `events.out.tfevents.*` (`real_jax.metrics.MetricsWriter`): one
  row per iteration (reward, KL, losses, the time of each call and reallocation);
* `timeline.jsonl`: one row per iteration with every call's and reallocation's device range, start
  and end (seconds since the run started);
* `plan.json`: the plan that ran (with `plan=search` also `predicted_timeline.json` / `.png`);
* `checkpoints/<step>/` (`real_jax.checkpoint.Checkpointer`): every `checkpoint_every` iterations
  and after the last one (`checkpoint_every=0`: only after the last): each model's params (a
  trained model's whole TrainState), the data iterator position, the seed and the program's state
  (`Program.state_dict()`, e.g. PPO's adaptive KL coefficient).

Resume: `run` on a workdir with a checkpoint continues from its newest step (the experiment's
fingerprint must match; the plan, `num_iterations`, `checkpoint_every` and `log_every` may differ):
models are restored straight into this plan's home layouts, the SFT warm-up is skipped, and the
metric/timeline files lose the rows of iterations not in the checkpoint, so a run killed at any
point and restarted with the same command writes what an uninterrupted run would (timings aside).

NaN guard: after each iteration, before anything is written or saved, a non-finite metric raises
`real_jax.metrics.NonFiniteError` naming the call (a train call for its model's `<model>/` keys)
and the iteration; the newest checkpoint is the last good state.

Multi-process (one process per host, `jax.distributed`): every process runs the same `run`; host
reads of sharded arrays go through `program.host` (process_allgather); only process 0 writes files
besides the checkpoints, which every process takes part in.
Callbacks `fn(iteration, metrics, state)` run after each iteration (after its checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from real_jax.checkpoint import Checkpointer
from real_jax.data import TaskSFTDataset, decode_responses, get_reward, get_task, sft_batches
from real_jax.experiment import Experiment
from real_jax.dataflow import CallKind
from real_jax.generation import SamplingConfig
from real_jax.metrics import MetricsWriter, TimelineWriter, check_calls_finite
from real_jax.models import abstract_model, create_model
from real_jax.optim import OptimizerConfig
from real_jax.runtime import offline, policy_gradient, ppo  # noqa: F401  (register the programs)
from real_jax.runtime.engine import Engine, ModelSlot, check_offload, check_plan, home_layouts
from real_jax.runtime.inputs import batch_arrays, make_batches, make_tokenizer
from real_jax.runtime.program import Program
from real_jax.runtime.progress import Progress, summary
from real_jax.runtime.registry import get_program
from real_jax.train_step import init_train_state, train_step
from search.plan import ExecutionPlan
from sharding import DeviceMesh, Layout, Strategy, activation_sharding


SEARCH_PROFILE = "h100_sxm"  # `plan=search` prices plans with this profile unless `search:<profile>` names one.


def resolve_plan(exp: Experiment, call_names: list[str], workdir: str | None = None, log=print) -> ExecutionPlan:
  """`colocated`, `search[:profile]`, a JSON file path, or an inline plan (see `search.plan`)."""
  text = exp.plan.strip()
  if text == "search" or text.startswith("search:"):
    return agree_across_processes(search_plan(exp, workdir, text.partition(":")[2] or SEARCH_PROFILE, log=log))
  if text == "colocated":
    n = jax.device_count()
    strategy = Strategy.parse(exp.colocated_strategy) if exp.colocated_strategy else Strategy(fsdp=n)
    return ExecutionPlan.colocated(call_names, Layout(DeviceMesh(0, n), strategy))
  if text.endswith(".json"):
    return ExecutionPlan.load(text)
  if "=" in text:
    return ExecutionPlan.parse(text)
  raise ValueError(f"config.plan={exp.plan!r}: expected 'colocated', 'search[:profile]', a plan .json path, or an "
                   "inline plan 'call=START:SIZE/STRATEGY, ...'")


def search_plan(exp: Experiment, workdir: str | None, profile_name: str, *, log=print,
                time_budget_s: float = 30.0) -> ExecutionPlan:
  """`config.plan=search`: the search Planner's plan for `exp` on this run's devices.

  Analytic estimator (its estimates cached on disk by `search.Estimator`), the graph unrolled 3
  iterations. Writes into `workdir`: `plan.json` (the plan, `predicted_s`, and `meta`: profile,
  method, per-call predicted seconds, baselines, and the search key), `predicted_timeline.json`
  (the simulator's events: name, kind, iteration, t0, t1, device ranges) and
  `predicted_timeline.png`, beside the measured `timeline.jsonl`. A workdir whose `plan.json` came
  from a search with the same key (experiment fingerprint, profile, device count) reuses it, so a
  resumed run keeps its plan (MCMC under a time budget need not find the same plan twice).
  """
  from real_jax.checkpoint import fingerprint
  from real_jax.plan_inputs import call_specs
  from search.estimator import Estimator
  from search.profile import Profile
  from search.search import Planner

  n = jax.device_count()
  profile = Profile.load(profile_name).on_local_devices(log=log)
  key = {"fingerprint": fingerprint(exp), "profile": profile.name, "devices": n, "memory_bytes": profile.memory_bytes}
  path = os.path.join(workdir, "plan.json") if workdir else None
  if path and os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved.get("meta", {}).get("search_key") == key:
      log(f"plan=search: reusing {path} (same experiment, profile and devices)")
      return ExecutionPlan.load(path)
  t0 = time.perf_counter()
  graph, specs = call_specs(exp, lowerable=False)
  planner = Planner(specs, graph.unroll(3), Estimator(profile, mode="analytic"), n)
  res = planner.search(time_budget_s=time_budget_s, seed=exp.seed)
  elapsed = time.perf_counter() - t0
  log(f"plan=search: {res.method}, {res.evaluated} plans simulated in {elapsed:.1f} s; predicted "
      f"{res.result.time:.4f} s/iteration on {n} x {profile.name}; baselines: " +
      ", ".join(f"{k} {r.time:.4f} s" for k, (_, r) in res.baselines.items()))
  if path and jax.process_index() == 0:
    d = res.plan.to_dict()
    d["predicted_s"] = res.result.time
    d["meta"] = {"profile": profile.name, "devices": n, "method": res.method, "search_s": elapsed,
                 "search_key": key, "call_seconds": res.result.call_seconds,
                 "baselines": {k: {"plan": p.to_dict(), "predicted_s": r.time} for k, (p, r) in res.baselines.items()}}
    with open(path, "w") as f:
      json.dump(d, f, indent=2, default=float)
    with open(os.path.join(workdir, "predicted_timeline.json"), "w") as f:
      json.dump({"predicted_s": res.result.time, "iterations": res.result.iterations, "profile": profile.name,
                 "events": [dataclasses.asdict(e) for e in res.result.events]}, f, default=float)
    try:
      from search.timeline import draw
      draw(res.result.events, n, os.path.join(workdir, "predicted_timeline.png"),
           title=f"{res.plan.name}: {res.result.time:.4f} s/iteration predicted on {n} x {profile.name}")
    except ImportError as e:  # matplotlib missing: the JSON timeline is still there.
      log(f"plan=search: no predicted_timeline.png ({e})")
  return res.plan


def agree_across_processes(plan: ExecutionPlan) -> ExecutionPlan:
  """Process 0's plan, on every process.

  Each process runs the search on its own; MCMC under a wall-clock budget, or a `plan.json` that only
  process 0's workdir holds, can give processes different plans, and processes running different
  programs deadlock in their first collective. So process 0's plan is broadcast (as JSON bytes) and
  every process runs that one.
  """
  if jax.process_count() == 1:
    return plan
  from jax.experimental import multihost_utils
  mine = np.frombuffer(json.dumps(plan.to_dict(), sort_keys=True).encode(), np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int32(mine.size)))
  buf = mine if jax.process_index() == 0 else np.zeros(size, np.uint8)
  agreed = bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf)).astype(np.uint8))
  return ExecutionPlan.from_dict(json.loads(agreed.decode()))


class RuleReward:
  """Scores decoded responses with a rule (host side): `fn(prompt, response, answer) -> float`.

  `host_batch` holds one prompt and answer per prompt; a call on prompts x n rows (group-major)
  repeats them n times.
  """

  def __init__(self, fn, tokenizer):
    self.fn, self.tok = fn, tokenizer

  def __call__(self, host_batch, tokens, resp_mask):
    # Ids the model has but the tokenizer lacks (a vocab padded for sharding) count as no text.
    tokens = np.where(tokens < self.tok.vocab_size, tokens, self.tok.pad_id)
    texts = decode_responses(self.tok, tokens, resp_mask)
    reps = len(texts) // len(host_batch["prompts"])
    prompts = np.repeat(np.asarray(host_batch["prompts"], object), reps)
    answers = np.repeat(np.asarray(host_batch["answers"], object), reps)
    return np.asarray([self.fn(p, r, a) for p, r, a in zip(prompts, texts, answers)], np.float32)


def reward_rule(exp: Experiment, tok) -> RuleReward | None:
  spec = exp.models.get("reward")
  if spec is None or not spec.rule:
    return None
  fn = get_task(exp.data.task, **dict(exp.data.task_kwargs)).reward if spec.rule == "task" else get_reward(spec.rule)
  return RuleReward(fn, tok)


def _sft_warmup(exp: Experiment, model, layout: Layout, tok, log) -> Any:
  """Supervised steps on task demonstrations; returns the trained parameter state."""
  opt = OptimizerConfig(lr=exp.sft_learning_rate, warmup_steps=0, decay="constant", decay_steps=1)
  state = init_train_state(model, opt, layout)
  graphdef = nnx.graphdef(model)
  it = sft_batches(TaskSFTDataset(exp.data.task, tok, seed=exp.seed + 1, size=4096), exp.data.batch_size,
                   seed=exp.seed)
  loss = float("nan")
  for step in range(exp.sft_warmup_steps):
    b = next(it)
    batch = {"tokens": b.tokens_BT.astype(np.int32), "mask": b.mask_BT}
    sh = activation_sharding(layout, ("batch", None), batch["tokens"].shape)
    batch = {k: jax.device_put(v, sh) for k, v in batch.items()}
    state, m = train_step(graphdef, _sft_loss, opt, layout, state, {**batch, "loss_mask": jax.device_put(
        b.loss_mask_BT, sh)})
    if step % 50 == 0 or step == exp.sft_warmup_steps - 1:
      loss = float(m["loss"])
      log(f"sft warm-up step {step}: loss {loss:.3f}")
  return state.params


def _sft_loss(model, batch):
  """Next-token loss on completion tokens only (loss_mask), attending to every real token."""
  tokens, mask = batch["tokens"], batch["mask"].astype(bool)
  nll = -model.token_logprobs(tokens, mask, train=True)[:, :-1]
  m = batch["loss_mask"][:, 1:].astype(jnp.float32)
  per_row = jnp.sum(nll * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
  return jnp.mean(per_row), {}


@dataclasses.dataclass
class RunState:
  """What iteration callbacks see: the experiment, its engine (model slots: params, train states),
  its program, the data iterator (`batches.state()` resumes it) and the workdir."""

  experiment: Experiment
  engine: Engine
  program: Program
  batches: Any
  workdir: str
  plan: ExecutionPlan


# `callback(iteration, metrics, state)` runs after each iteration's metrics are written: the hook for
# checkpoints (every `checkpoint_every` iterations) and metric writers (TensorBoard).
IterationCallback = Callable[[int, dict, RunState], None]


def run(exp: Experiment, workdir: str, *, log=print, progress: bool | None = None,
        callbacks: Sequence[IterationCallback] = ()) -> list[dict]:
  """Runs `exp`, writing metrics and timelines into `workdir`; returns the metric rows.

  progress: a one-line progress display on stderr (None: only when stderr is a terminal).
  callbacks: called as `callback(iteration, metrics, state)` after every iteration.
  """
  os.makedirs(workdir, exist_ok=True)
  program_cls = get_program(exp.algorithm)
  tok = make_tokenizer(exp.data)
  graph = program_cls.graph(exp)
  names = [c.name for c in graph.calls]
  plan = resolve_plan(exp, names, workdir, log=log)
  plan.check_covers(names)
  check_plan_for(program_cls, exp, graph, plan)
  abstract = {r: nnx.state(abstract_model(exp.models[r].model_config(), head=exp.models[r].head))
              for r in graph.models if not exp.models[r].rule}
  check_plan(graph, plan, abstract)  # Before any model is created or anything compiles.
  homes = home_layouts(graph, plan)
  primary = jax.process_index() == 0
  if primary and not exp.plan.strip().startswith("search"):  # A searched plan.json is written with its meta.
    plan.save(os.path.join(workdir, "plan.json"))
  log(plan.table({c.name: c.model for c in graph.calls}))

  ckpt = Checkpointer(workdir, every=exp.checkpoint_every, config=exp)
  start = ckpt.latest_step() or 0
  restored_extra = ckpt.read_meta(start)["extra"] if start else {}
  if start > exp.num_iterations:
    log(f"checkpoint {ckpt.step_dir(start)} is past num_iterations={exp.num_iterations}: nothing to run")
  # Resuming: the checkpoint overwrites every model, so the SFT warm-up is skipped (models are still
  # created, as templates and in their home layouts).
  models = _build_models(exp, graph, homes, tok, log, warmup=not start)
  slots = {}
  for role, model in models.items():
    graphdef, params = nnx.split(model)
    slots[role] = ModelSlot(role, graphdef, params, homes[role])
  for role in graph.trained_models():
    slots[role].train_state = init_train_state(models[role], exp.optim[role], homes[role])
    slots[role].params = slots[role].train_state.params
  del models

  sampling = SamplingConfig(max_new_tokens=exp.sampling.max_new_tokens, temperature=exp.sampling.temperature,
                            top_k=exp.sampling.top_k, top_p=exp.sampling.top_p, n=exp.sampling.n_samples,
                            eos_id=None if exp.sampling.ignore_eos else tok.eos_id, pad_id=tok.pad_id,
                            bucket=16)
  program = program_cls(exp, {r: s.graphdef for r, s in slots.items()}, sampling, reward_rule(exp, tok))
  engine = Engine(graph, plan, slots, program.functions())
  batches = make_batches(exp, tok, program_cls.data)
  state = RunState(exp, engine, program, batches, workdir, plan)
  placement = {k: plan[next(n for n in graph.order if k in graph[n].inputs)] for k in graph.external}

  finite_calls = {f"{c.model}/": c.name for c in graph.calls if c.kind is CallKind.TRAIN_STEP}
  rows_out = []
  metrics_out = timeline_out = None
  bar = Progress(exp.num_iterations, enabled=progress if primary else False)
  try:
    if start:  # Resume: arrays land directly in this plan's home layouts.
      r = ckpt.restore(start, {role: homes[role] for role in slots}, like=slots)
      for role, slot in slots.items():
        slot.train_state = r.train_states.get(role)
        slot.set_params(r.params[role])
      engine.rest_offloaded()  # The restored frozen models land on the devices: back to host memory.
      del r
      batches.restore(restored_extra["data"])
      program.load_state_dict(restored_extra.get("program", {}))
      engine.iteration = start
      log(f"resumed from checkpoint {ckpt.step_dir(start)} (iteration {start} runs next)")
    # Resuming at `start` drops rows >= start (a killed run's iterations past its checkpoint).
    metrics_out = MetricsWriter(workdir, start_iteration=start)
    timeline_out = TimelineWriter(workdir, start_iteration=start)
    for it in range(start, exp.num_iterations):
      t0 = time.perf_counter()
      arrays, program.host_batch = batch_arrays(program_cls.data, next(batches))
      inputs = {k: jax.device_put(v, activation_sharding(placement[k], ("batch",) + (None,) * (v.ndim - 1), v.shape))
                for k, v in arrays.items() if k in placement}
      data = engine.run_iteration(inputs)
      metrics = program.end_iteration(data)
      metrics["iteration"] = it
      metrics["time/iteration"] = time.perf_counter() - t0
      recs = engine.iteration_records(it)
      for rec in recs:
        metrics[f"time/{rec['kind']}/{rec['name']}"] = (rec["end"] or rec["start"]) - rec["start"]
      # Before anything is written or saved: a non-finite iteration never reaches a checkpoint.
      check_calls_finite(metrics, iteration=it, calls=finite_calls)
      rows_out.append(metrics)
      metrics_out.write(metrics)
      timeline_out.write(it, recs)
      step = it + 1
      final = step == exp.num_iterations
      if final or ckpt.due(step):
        resting = [r for r, slot in engine.slots.items() if slot.offloaded]
        for role in resting:  # Frozen models resting in host memory are saved from the devices...
          engine.to_device(role)
        ckpt.save(step, engine.slots, {"iteration": step, "data": batches.state(), "rng": {"seed": exp.seed},
                                       "program": program.state_dict()}, force=final)
        for role in resting:  # ...and go back to rest (save returns once the arrays are copied off).
          engine.offload(role)
      bar.update(it, metrics)
      if it % exp.log_every == 0 or it == exp.num_iterations - 1:
        log(f"iter {it:4d}  {summary(metrics)}")
      for cb in callbacks:
        cb(it, metrics, state)
  finally:
    bar.close()
    ckpt.close()  # Waits for the last asynchronous save: the newest checkpoint is complete.
    for w in (metrics_out, timeline_out):
      if w is not None:
        w.close()
  return rows_out


def abstract_slots(exp: Experiment, plan: ExecutionPlan | None = None) -> tuple[dict[str, ModelSlot], dict]:
  """(role -> ModelSlot of abstract params / train state, role -> home layout) of `exp` under `plan`
  (default: `exp.plan`): templates for `Checkpointer.restore` outside a run (evaluation, export)."""
  graph = get_program(exp.algorithm).graph(exp)
  plan = plan or resolve_plan(exp, [c.name for c in graph.calls])
  homes = home_layouts(graph, plan)
  trained = graph.trained_models()
  slots = {}
  for role in graph.models:
    spec = exp.models[role]
    if spec.rule or role not in homes:
      continue
    cfg, lay = spec.model_config(), homes[role]
    if role in trained:
      ts = jax.eval_shape(lambda: init_train_state(create_model(cfg, lay, seed=0, head=spec.head), exp.optim[role], lay))
      slots[role] = ModelSlot(role, None, ts.params, lay, train_state=ts)
    else:
      slots[role] = ModelSlot(role, None, nnx.state(abstract_model(cfg, head=spec.head)), lay)
  return slots, {r: homes[r] for r in slots}


def check_plan_for(program_cls, exp: Experiment, graph, plan: ExecutionPlan) -> None:
  """Program-level plan checks (before anything compiles): train mini-batches divide over the
  layout's data x fsdp x micro_batches, and only frozen models of the graph rest in host memory."""
  for name, per_mb in program_cls.train_rows(exp).items():
    st = plan[name].strategy
    shards = st.data * st.fsdp * st.micro_batches
    if per_mb % shards:
      raise ValueError(f"plan for call {name!r} ({plan[name]}): a {exp.algorithm} mini-batch of {per_mb} rows "
                       f"does not divide over data x fsdp x micro_batches = {shards}")
  check_offload(graph, plan)


def _build_models(exp: Experiment, graph, homes, tok, log, *, warmup: bool = True) -> dict:
  """The graph's network models, created sharded in their home layouts (copies after their sources)."""
  models = {}
  roles = [r for r in graph.models if not exp.models[r].rule]
  for role in sorted(roles, key=lambda r: exp.models[r].init.startswith("copy:")):
    spec = exp.models[role]
    cfg = spec.model_config()
    if cfg.vocab_size < tok.vocab_size:
      raise ValueError(f"config.models.{role}: vocab_size {cfg.vocab_size} < tokenizer's {tok.vocab_size}")
    if spec.init.startswith("copy:"):
      if spec.init[5:] not in models:
        raise ValueError(f"config.models.{role}.init={spec.init!r}: {spec.init[5:]!r} is not a network model of "
                         f"{exp.algorithm} ({sorted(models)})")
      src = models[spec.init[5:]]
      model = create_model(cfg, homes[role], seed=spec.seed, head=spec.head)
      if spec.head == "lm" and src.head == "lm":
        nnx.update(model, _moved(nnx.state(src), nnx.state(model)))
    elif spec.init.startswith("hf:"):
      from real_jax.models import load_pretrained
      model = load_pretrained(spec.init[3:], layout=homes[role], head=spec.head)
    else:
      model = create_model(cfg, homes[role], seed=spec.seed, head=spec.head)
    if role == "actor" and exp.sft_warmup_steps and warmup:
      nnx.update(model, _sft_warmup(exp, model, homes[role], tok, log))
    models[role] = model
  return models


def _moved(src_state, dst_state):
  """A fresh copy of `src_state`'s values placed like `dst_state` (on-device, never aliased)."""
  from sharding import reallocate
  leaves, treedef = jax.tree.flatten(src_state)
  targets = [x.sharding for x in jax.tree.leaves(dst_state)]
  moved = reallocate(leaves, targets)
  # reallocate may return the very buffers when nothing moves; a trained source would then delete them.
  copied = jax.jit(lambda t: [jnp.copy(x) for x in t], out_shardings=targets)(moved)
  return jax.tree.unflatten(treedef, copied)


def main_log(msg: str) -> None:
  print(msg, file=sys.stdout, flush=True)

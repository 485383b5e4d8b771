"""The training loop: builds models, data, plan and engine from an Experiment and runs it.

`run(exp, workdir)` is what `python -m real_jax.train`, the notebooks and the tests call. It writes
into `workdir`:
* `metrics.jsonl`: one row per iteration (reward, KL, losses, the time of each call and reallocation);
* `timeline.jsonl`: one row per iteration with every call's and reallocation's device range, start
  and end (seconds since the run started);
* `plan.json`: the plan that ran.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from real_jax.data import CharTokenizer, TaskDataset, TaskSFTDataset, get_task, prompt_batches, sft_batches
from real_jax.data.rewards import decode_responses
from real_jax.experiment import Experiment
from real_jax.generation import SamplingConfig
from real_jax.models import create_model
from real_jax.runtime.engine import Engine, ModelSlot, home_layouts
from real_jax.runtime.ppo import PPOProgram, ppo_graph
from real_jax.train_step import init_train_state, train_step
from real_jax.optim import OptimizerConfig
from search.plan import ExecutionPlan
from sharding import DeviceMesh, Layout, Strategy, activation_sharding


def resolve_plan(exp: Experiment, call_names: list[str]) -> ExecutionPlan:
  """`colocated`, a JSON file path, or an inline plan (see `search.plan`)."""
  text = exp.plan.strip()
  if text == "colocated":
    n = jax.device_count()
    strategy = Strategy.parse(exp.colocated_strategy) if exp.colocated_strategy else Strategy(fsdp=n)
    return ExecutionPlan.colocated(call_names, Layout(DeviceMesh(0, n), strategy))
  if text.endswith(".json"):
    return ExecutionPlan.load(text)
  if "=" in text:
    return ExecutionPlan.parse(text)
  raise ValueError(f"config.plan={exp.plan!r}: expected 'colocated', a plan .json path, or an inline plan "
                   "'call=START:SIZE/STRATEGY, ...'")


class _RuleReward:
  """Scores decoded responses with a task's rule (host side)."""

  def __init__(self, task, tokenizer):
    self.task, self.tok = task, tokenizer

  def __call__(self, host_batch, tokens, resp_mask):
    # Ids the model has but the tokenizer lacks (a vocab padded for sharding) count as no text.
    tokens = np.where(tokens < self.tok.vocab_size, tokens, self.tok.pad_id)
    texts = decode_responses(self.tok, tokens, resp_mask)
    return np.asarray([self.task.reward(p, r, a) for p, r, a in
                       zip(host_batch["prompts"], texts, host_batch["answers"])], np.float32)


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
  logits = model(tokens, attention_mask_BT=mask, train=True)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  m = batch["loss_mask"][:, 1:].astype(jnp.float32)
  per_row = jnp.sum(nll * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
  return jnp.mean(per_row), {}


def run(exp: Experiment, workdir: str, *, log=print) -> list[dict]:
  """Runs `exp`, writing metrics and timelines into `workdir`; returns the metric rows."""
  os.makedirs(workdir, exist_ok=True)
  if exp.algorithm != "ppo":
    raise ValueError(f"algorithm {exp.algorithm!r} is not supported by the runtime yet")
  if not exp.data.task:
    raise ValueError("config.data.path: JSON-lines prompt datasets are not wired into the runtime yet; "
                     "use a built-in config.data.task")
  tok = CharTokenizer()
  task = get_task(exp.data.task, **dict(exp.data.task_kwargs))
  rows = exp.data.batch_size * exp.sampling.n_samples
  graph = ppo_graph(rows)
  plan = resolve_plan(exp, [c.name for c in graph.calls])
  plan.check_covers([c.name for c in graph.calls])
  for name in ("actor_train", "critic_train"):
    st = plan[name].strategy
    shards = st.data * st.fsdp * st.micro_batches
    per_mb = rows // exp.ppo.mini_batches
    if per_mb % shards:
      raise ValueError(f"plan for call {name!r} ({plan[name]}): a PPO mini-batch of {per_mb} rows (rows {rows} / "
                       f"config.ppo.mini_batches {exp.ppo.mini_batches}) does not divide over data x fsdp x "
                       f"micro_batches = {shards}")
  homes = home_layouts(graph, plan)
  plan.save(os.path.join(workdir, "plan.json"))
  log(plan.table({c.name: c.model for c in graph.calls}))

  # Models, created sharded in their home layouts.
  models, slots = {}, {}
  order = sorted(exp.models, key=lambda r: exp.models[r].init.startswith("copy:"))
  for role in order:
    spec = exp.models[role]
    if spec.rule:
      continue
    cfg = spec.model_config()
    if cfg.vocab_size < tok.vocab_size:
      raise ValueError(f"config.models.{role}: vocab_size {cfg.vocab_size} < tokenizer's {tok.vocab_size}")
    if spec.init.startswith("copy:"):
      src = models[spec.init[5:]]
      model = create_model(cfg, homes[role], seed=spec.seed, head=spec.head)
      if spec.head == "lm" and src.head == "lm":
        nnx.update(model, _moved(nnx.state(src), nnx.state(model)))
    elif spec.init.startswith("hf:"):
      from real_jax.models import load_pretrained
      model = load_pretrained(spec.init[3:], layout=homes[role], head=spec.head)
    else:
      model = create_model(cfg, homes[role], seed=spec.seed, head=spec.head)
    if role == "actor" and exp.sft_warmup_steps:
      nnx.update(model, _sft_warmup(exp, model, homes[role], tok, log))
    models[role] = model
  for role, model in models.items():
    graphdef, params = nnx.split(model)
    slots[role] = ModelSlot(role, graphdef, params, homes[role])
  for role in ("actor", "critic"):
    slots[role].train_state = init_train_state(models[role], exp.optim[role], homes[role])
    slots[role].params = slots[role].train_state.params

  reward_rule = _RuleReward(task, tok) if exp.models["reward"].rule else None
  sampling = SamplingConfig(max_new_tokens=exp.sampling.max_new_tokens, temperature=exp.sampling.temperature,
                            top_k=exp.sampling.top_k, top_p=exp.sampling.top_p, n=exp.sampling.n_samples,
                            eos_id=tok.eos_id, pad_id=tok.pad_id, bucket=16)
  program = PPOProgram(exp.ppo, sampling, dict(exp.optim), {r: s.graphdef for r, s in slots.items()},
                       reward_rule=reward_rule, seed=exp.seed)
  engine = Engine(graph, plan, slots, program.functions())

  prompts = prompt_batches(TaskDataset(task, tok, seed=exp.seed, size=None), exp.data.batch_size, seed=exp.seed)
  rows_out = []
  mpath, tpath = os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "timeline.jsonl")
  for path in (mpath, tpath):  # A fresh run starts fresh files (resume arrives with checkpoints).
    open(path, "w").close()
  gen_layout = plan["actor_gen"]
  for it in range(exp.num_iterations):
    t0 = time.perf_counter()
    b = next(prompts)
    program.host_batch = {"prompts": list(np.repeat(np.asarray(b.prompts, object), exp.sampling.n_samples)),
                          "answers": list(np.repeat(np.asarray(b.answers, object), exp.sampling.n_samples))}
    sh = activation_sharding(gen_layout, ("batch", None), b.tokens_BT.shape)
    inputs = {"prompts": jax.device_put(b.tokens_BT.astype(np.int32), sh), "prompt_mask": jax.device_put(b.mask_BT, sh)}
    data = engine.run_iteration(inputs)
    metrics = program.end_iteration(data)
    metrics["iteration"] = it
    metrics["time/iteration"] = time.perf_counter() - t0
    recs = engine.iteration_records(it)
    for r in recs:
      metrics[f"time/{r['kind']}/{r['name']}"] = (r["end"] or r["start"]) - r["start"]
    rows_out.append(metrics)
    with open(mpath, "a") as f:
      f.write(json.dumps(metrics) + "\n")
    with open(tpath, "a") as f:
      f.write(json.dumps({"iteration": it, "records": recs}) + "\n")
    if it % exp.log_every == 0 or it == exp.num_iterations - 1:
      log(f"iter {it:4d}  reward {metrics['reward']:.3f}  kl {metrics['kl']:+.4f}  "
          f"len {metrics['response_len']:.1f}  {metrics['time/iteration']:.2f}s")
  return rows_out


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

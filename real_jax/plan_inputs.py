"""What the search needs to know of an experiment: its dataflow graph and a `search.CallSpec` per call.

`search` knows nothing of Flax modules (DESIGN.md section 1); this module is the glue. Each
CallSpec carries the model's shape numbers (for the analytic estimator tier) and a
`lower(layout) -> {"main": Lowered, ...}` callback that lowers *the jitted functions that run*
(`generation.sampler`, the `inference` jitted calls, `train_step.make_train_step`) on abstract inputs
(`jax.ShapeDtypeStruct`; nothing allocated), for the compiled tier:

* generate: `main` = the sampler (prefill + the decode loop, counted once by XLA), `decode` = one
  decode step (the loop body: `Transformer.hidden` with the cache + `project`), so the estimator
  can count generation as main + (new_tokens - 1) x decode.
* inference / train_step with micro_batches k > 1: `main` = the call as it runs (its memory),
  `flat` = the same call with k = 1 (XLA counts the micro-batch loop body once).

PPO train calls run `ppo_epochs x mini_batches` train steps on `rows / mini_batches` rows each;
the spec says so with `repeats`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from real_jax import inference
from real_jax._calls import batch_sharding, compute_params, sharding_hook
from real_jax.dataflow import Graph
from real_jax.experiment import Experiment
from real_jax.generation import SamplingConfig, bucket_length, model_config, sampler
from real_jax.models import KVCache, abstract_model, activation_constraints, param_count
from real_jax.optim import make_optimizer
from real_jax.train_step import TrainState, make_train_step
from search import CallSpec, ModelShape
from sharding import Layout, activation_sharding, shardings_for

PROMPT_BUCKET = 16  # the runtime's SamplingConfig bucket


def model_shape(cfg, head: str) -> ModelShape:
  return ModelShape(cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size,
                    param_count(cfg, head), jnp.dtype(cfg.dtype).itemsize, jnp.dtype(cfg.param_dtype).itemsize,
                    cfg.remat)


@functools.lru_cache(maxsize=None)
def _abstract(cfg, head):
  # Lowered with the layer loop scanned whatever the run uses: one layer compiles instead of L (the
  # search compiles many layouts), and `search.estimator.layer_loop_correction` adds the other L - 1
  # layers from the analytic tier. What the unrolled loop saves on GPU (the scan's residual copies)
  # is then left to the profile's calibration.
  return nnx.split(abstract_model(cfg.replace(unroll_layers=False), head=head))


def _sds(shape, dtype):
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def _decode_step(graphdef, layout: Layout):
  def step(state, cache, tok_B, live_B):
    with activation_constraints(sharding_hook(layout)):
      cfg = model_config(graphdef, state)
      model = nnx.merge(graphdef, compute_params(state, cfg.dtype))
      h, cache = model.hidden(tok_B[:, None], attention_mask_BT=live_B[:, None], cache=cache, scan_layers=False)
      return model.project(h)[:, 0], cache
  return step


def lower_generate(cfg, sampling: SamplingConfig, rows: int, prompt_len: int):
  graphdef, state = _abstract(cfg, "lm")

  def lower(layout: Layout):
    fn = sampler(graphdef, state, (rows, prompt_len), sampling, layout)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    main = fn.lower(state, _sds((rows, prompt_len), jnp.int32), _sds((rows, prompt_len), bool), rng)
    cache = jax.eval_shape(lambda: KVCache.zeros(cfg, rows, prompt_len + sampling.max_new_tokens))
    names = KVCache.logical_axes()
    csh = KVCache(*(activation_sharding(layout, n, tuple(x.shape)) for x, n in
                    zip((cache.k, cache.v, cache.valid), (names.k, names.v, names.valid))), layout.replicated())
    bsh = batch_sharding(layout, (rows,))
    dec = jax.jit(_decode_step(graphdef, layout), in_shardings=(shardings_for(state, layout), csh, bsh, bsh),
                  out_shardings=(batch_sharding(layout, (rows, cfg.vocab_size)), csh), donate_argnums=(1,))
    return {"main": main, "decode": dec.lower(state, cache, _sds((rows,), jnp.int32), _sds((rows,), bool))}
  return lower


def lower_inference(cfg, head: str, rows: int, seq_len: int, temperature: float = 1.0):
  graphdef, state = _abstract(cfg, head)
  tokens = _sds((rows, seq_len), jnp.int32)

  def one(layout, k):
    if head == "lm":
      fn = inference._jitted(("logprobs", float(temperature), k), graphdef, state, tokens, layout,
                             lambda: inference._logprob_fn(graphdef, layout, float(temperature), k), 1)
    else:
      fn = inference._jitted(("values", k), graphdef, state, tokens, layout,
                             lambda: inference._value_fn(graphdef, layout, k), 2)
    return fn.lower(state, tokens, _sds((rows, seq_len), bool))

  def lower(layout: Layout):
    k = layout.strategy.micro_batches
    return {"main": one(layout, k)} | ({"flat": one(layout, 1)} if k > 1 else {})
  return lower


def lower_train(cfg, head: str, loss_fn, opt_cfg, batch_example: dict):
  graphdef, state = _abstract(cfg, head)
  params = nnx.state(nnx.merge(graphdef, state), nnx.Param)
  opt_state = jax.eval_shape(make_optimizer(opt_cfg).init, params)
  ts = TrainState(params, opt_state, _sds((), jnp.int32))

  def one(layout, k):
    fn = make_train_step(graphdef, loss_fn, opt_cfg, layout, micro_batches=k, params=params,
                         batch_example=batch_example)
    return fn.lower(ts, batch_example)

  def lower(layout: Layout):
    k = layout.strategy.micro_batches
    return {"main": one(layout, k)} | ({"flat": one(layout, 1)} if k > 1 else {})
  return lower


def ppo_call_specs(exp: Experiment, *, lowerable: bool = True) -> tuple[Graph, dict[str, CallSpec]]:
  """The PPO graph of `exp` and a CallSpec per call (with lower callbacks when `lowerable`)."""
  from real_jax.runtime.ppo import _actor_loss, _critic_loss, ppo_graph

  rows = exp.data.batch_size * exp.sampling.n_samples
  graph = ppo_graph(rows)
  p = bucket_length(exp.data.max_prompt_len, PROMPT_BUCKET)
  m = exp.sampling.max_new_tokens
  t = p + m
  mb = exp.ppo.mini_batches
  train_rows = rows // mb
  repeats = exp.ppo.ppo_epochs * mb
  sampling = SamplingConfig(max_new_tokens=m, temperature=exp.sampling.temperature, top_k=exp.sampling.top_k,
                            top_p=exp.sampling.top_p, bucket=PROMPT_BUCKET)
  cfgs = {r: exp.models[r].model_config() for r in exp.models}
  heads = {r: exp.models[r].head for r in exp.models}
  f32, i32 = jnp.float32, jnp.int32
  base = {"tokens": _sds((train_rows, t), i32), "attn_mask": _sds((train_rows, t), bool),
          "logprobs": _sds((train_rows, t), f32), "logprob_mask": _sds((train_rows, t), bool),
          "ref_logprobs": _sds((train_rows, t), f32), "values": _sds((train_rows, t), f32),
          "kl_coef": _sds((train_rows,), f32)}
  actor_batch = base | {"advantages": _sds((train_rows, t), f32)}
  critic_batch = base | {"returns": _sds((train_rows, t), f32)}
  temp = float(exp.sampling.temperature)
  specs = {}
  for c in graph.calls:
    cfg, head = cfgs[c.model], heads[c.model]
    shape = model_shape(cfg, head)
    common = dict(name=c.name, model=c.model, shape=shape, head=head)
    if c.name == "actor_gen":
      specs[c.name] = CallSpec(kind="generate", batch=rows, prompt_len=p, new_tokens=m,
                               key=f"sampling={sampling}", **common,
                               lower=lower_generate(cfg, sampling, rows, p) if lowerable else None)
    elif c.name.endswith("_inf"):
      specs[c.name] = CallSpec(kind="inference", batch=rows, seq_len=t, key=f"temperature={temp}", **common,
                               lower=lower_inference(cfg, head, rows, t, temp) if lowerable else None)
    else:
      role = c.model
      loss = (functools.partial(_actor_loss, exp.ppo, temp) if role == "actor"
              else functools.partial(_critic_loss, exp.ppo))
      batch = actor_batch if role == "actor" else critic_batch
      specs[c.name] = CallSpec(kind="train_step", batch=train_rows, seq_len=t, trained=True, repeats=repeats,
                               key=f"ppo={exp.ppo},optim={exp.optim[role]}", **common,
                               lower=lower_train(cfg, head, loss, exp.optim[role], batch) if lowerable else None)
  return graph, specs


def call_specs(exp: Experiment, *, lowerable: bool = True) -> tuple[Graph, dict[str, CallSpec]]:
  if exp.algorithm != "ppo":
    raise ValueError(f"config.algorithm={exp.algorithm!r}: the planner knows the PPO graph only so far")
  return ppo_call_specs(exp, lowerable=lowerable)

"""What the search needs to know of an experiment: its dataflow graph and a `search.CallSpec` per call.

`search` knows nothing of Flax modules (DESIGN.md section 1); this module is the glue. Each
CallSpec carries the model's shape numbers (for the analytic estimator tier) and a
`lower(layout) -> {"main": Lowered, ...}` callback that lowers *the jitted functions that run*
(`generation.sampler`, the `inference` jitted calls, `train_step.make_train_step`) on abstract inputs
(`jax.ShapeDtypeStruct`; nothing allocated), for the compiled tier:

* generate: `main` = the sampler (prefill, then the layered decode loop: one while loop per
  segment, each body counted once by XLA), `decode` = one iteration of that loop (`_decode_step`:
  `Transformer.hidden` over per-layer weights and cache, `project`, the draw of the next token) at
  the step-weighted mean cache prefix, and `decode_extra` = the steps `main` does not count, so the
  estimator counts generation as main + decode_extra x decode. All its layer loops are Python loops
  (`layer_loop="unrolled"`): no layer correction.
* inference / train_step: `main` = the call as it runs (its memory); with micro_batches k > 1 also
  `flat` = the same call with k = 1 (XLA counts the micro-batch loop body once). Lowered with the
  layer loop as a `scan` (`layer_loop="scan"`, see `_abstract`), and with the LM head's chunk count
  (`logits_chunks`): the chunked log-probs are a scan too, counted once.

The run unrolls full-sequence layer loops (`ModelConfig.unroll_layers`, default True), the lowering
here does not: compiling one layer instead of L keeps the compiled tier affordable over many
layouts, and `search.estimator.layer_loop_correction` (which assumes the scan) adds the other L - 1
layers from the analytic tier. Flops and HBM bytes per layer are the same either way; what the
unrolled loop saves on GPU (the scan's residual copies: a Qwen2.5-0.5B train step went from 392 to
296 ms on one H100) is left to the profile's time calibration, which times the unrolled code.

PPO train calls run `ppo_epochs x mini_batches` train steps on `rows / mini_batches` rows each;
the spec says so with `repeats`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from real_jax import inference
from real_jax._calls import batch_sharding, compute_params, sharding_hook
from real_jax.dataflow import Graph
from real_jax.experiment import Experiment
from real_jax.generation import (SamplingConfig, bucket_length, cache_shardings, layered_decode_step, sampler,
                                 segment_ends)
from real_jax.models import KVCache, abstract_model, activation_constraints, param_count
from real_jax.models.transformer import attention_kernel, decode_on_full_cache, layer_arrays, logits_chunk_size
from real_jax.optim import make_optimizer
from real_jax.train_step import TrainState, make_train_step
from search import CallSpec, ModelShape
from sharding import Layout, shardings_for

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


def _decode_step(graphdef, layout: Layout, sampling: SamplingConfig, kv_len: int):
  """One iteration of the sampler's layered decode loop (`generation.layered_decode_step`, the
  function its while loops run): token t through every layer (per-layer weights and cache; attention
  over the first `kv_len` slots or, on GPU in bf16, the fused kernel over the filled ones:
  `decode_on_full_cache`), project, draw token t + 1; then the loop's stop test.

  Its inputs are what the loop carries or closes over: the compute-dtype state (the embedding and
  head; the stacked layers go unused and jit prunes them), the per-layer compute-dtype weights that
  the sampler slices once before its loops, the per-layer cache and the loop's carry.
  """
  def step(state, lps, cache, t, tok_B, live_B, out_BM, lp_BM, done_B, rng):
    with activation_constraints(sharding_hook(layout)):
      model = nnx.merge(graphdef, state)
      eos = jnp.asarray(sampling.eos_ids or (-1,), jnp.int32)
      t, cache, tok, live_B, out_BM, lp_BM, done_B = layered_decode_step(
          model, lps, sampling, eos, rng, kv_len, (t, cache, tok_B, live_B, out_BM, lp_BM, done_B))
      # The loop's condition, evaluated once per iteration (an all-reduce when rows are split).
      going = ~jnp.all(done_B)
      return cache, t, tok, live_B, out_BM, lp_BM, done_B, going
  return step


def _layer_sharding(stacked: NamedSharding) -> NamedSharding:
  """One layer's slice of a `layers`-stacked weight: its sharding without the leading dimension (the
  sampler's loops use the slices so sharded: an FSDP layout gathers every layer's weights in every
  decode step, as the compiled sampler's loop bodies show)."""
  return NamedSharding(stacked.mesh, PartitionSpec(*stacked.spec[1:]))


def decode_schedule(sampling: SamplingConfig, prompt_len: int) -> tuple[list[tuple[int, int]], int]:
  """([(decode steps, cache slots read), ...] per while loop of the layered sampler, cache slots).

  The layered loop runs tokens 0 .. M-2 (token M-1 is drawn, never run) in `segment_ends` segments;
  segment [a, end) reads a static cache prefix of P + end - 1 slots; the cache holds P + M - 1.
  """
  m = sampling.max_new_tokens
  out, a = [], 0
  for end in segment_ends(m - 1, sampling.decode_segments):
    out.append((end - a, prompt_len + end - 1))
    a = end
  return out, prompt_len + m - 1


def decode_kv_slots(cfg, sampling: SamplingConfig, prompt_len: int, platform: str | None = None) -> float:
  """Mean cache slots one decode step of the layered loop reads per row, on `platform` (default: this
  machine's backend).

  Where the step runs the fused kernel over the per-layer cache (`decode_on_full_cache`: bf16/fp16 on
  GPU, attention_impl not "xla"), which the model hands the filled length (`fused_decode_attention`'s
  kv_len): the mean filled length P + M / 2 (step t reads P + t + 1 slots). Otherwise the step-weighted mean of the
  segments' static prefixes. (`sampling.decode == "stacked"` reads all P + M slots.)"""
  if sampling.decode != "layered":
    return float(prompt_len + sampling.max_new_tokens)
  segs, slots = decode_schedule(sampling, prompt_len)
  full = decode_on_full_cache(cfg, cfg.dtype, platform)
  steps = sum(n for n, _ in segs)
  if not steps:
    return float(slots)
  if full:
    return prompt_len + sampling.max_new_tokens / 2
  return sum(n * kv for n, kv in segs) / steps


def fused_attention(cfg, platform: str | None = None) -> bool:
  """Whether full-sequence attention runs as a fused kernel on `platform`
  (`models.transformer.attention_kernel`: cuDNN for bf16/fp16 on GPU unless attention_impl says
  otherwise; XLA's unfused path otherwise). A cuDNN trace failure, where `attention` falls back to
  XLA, is not foreseen here."""
  return attention_kernel(cfg.attention_impl, cfg.dtype, platform) == "cudnn"


def lower_decode_step(cfg, sampling: SamplingConfig, rows: int, prompt_len: int, kv_len: int, layout: Layout):
  """One iteration of the layered decode loop (`_decode_step`) lowered under `layout` on abstract
  inputs, with the shardings the sampler gives them (the cache's `generation.cache_shardings`; the
  carry's [B] and [B, M] arrays batch-split), the cache and outputs donated (updated in place)."""
  graphdef, state = _abstract(cfg, "lm")
  _, slots = decode_schedule(sampling, prompt_len)
  m = sampling.max_new_tokens
  i32 = jnp.int32
  st_sh = shardings_for(state, layout)
  state_c = jax.eval_shape(lambda s: compute_params(s, cfg.dtype), state)
  lps = jax.eval_shape(lambda s: layer_arrays(nnx.merge(graphdef, s).layers.arrays(), cfg.n_layers), state_c)
  stacked_sh = nnx.merge(graphdef, st_sh).layers.arrays()
  lps_sh = [{k: _layer_sharding(sh) for k, sh in stacked_sh.items()} for _ in range(cfg.n_layers)]
  cache = jax.eval_shape(lambda: KVCache.zeros(cfg, rows, slots, per_layer=True))
  csh = cache_shardings(cache, layout)
  b1, bm = batch_sharding(layout, (rows,)), batch_sharding(layout, (rows, m))
  rep = layout.replicated()
  carry_sh = (csh, rep, b1, b1, bm, bm, b1)
  dec = jax.jit(_decode_step(graphdef, layout, sampling, kv_len), in_shardings=(st_sh, lps_sh) + carry_sh + (rep,),
                out_shardings=carry_sh + (rep,), donate_argnums=(2, 6, 7))
  rng = jax.eval_shape(lambda: jax.random.key(0))
  return dec.lower(state_c, lps, cache, _sds((), i32), _sds((rows,), i32), _sds((rows,), bool), _sds((rows, m), i32),
                   _sds((rows, m), jnp.float32), _sds((rows,), bool), rng)


def lower_sampler(cfg, sampling: SamplingConfig, rows: int, prompt_len: int, layout: Layout):
  """The runtime's jitted sampler (`generation.sampler`) lowered under `layout` on abstract inputs."""
  graphdef, state = _abstract(cfg, "lm")
  fn = sampler(graphdef, state, (rows, prompt_len), sampling, layout)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  return fn.lower(state, _sds((rows, prompt_len), jnp.int32), _sds((rows, prompt_len), bool), rng)


def lower_generate(cfg, sampling: SamplingConfig, rows: int, prompt_len: int):
  """lower(layout) -> {"main": the sampler, "decode": one layered decode step, "decode_extra": steps
  `main` does not count, "layer_loop": "unrolled"}.

  XLA counts each while body once, so `main` holds the prefill, the first draw and one decode step
  per segment. The other steps, sum over segments of (steps - 1), are priced by one decode step
  (`lower_decode_step`) lowered at their step-weighted mean cache prefix (flops and bytes are linear
  in it; on GPU in bf16 the fused kernel stops at the filled length, `decode_kv_slots`). Every layer loop of the
  layered sampler is a Python loop (all L layers in the HLO): no layer-loop correction.
  """
  if sampling.decode != "layered":
    raise ValueError(f"plan_inputs.lower_generate: SamplingConfig.decode={sampling.decode!r}; the estimator "
                     "lowers the layered decode loop the runtime uses")
  segs, _ = decode_schedule(sampling, prompt_len)
  extra = sum(n - 1 for n, _ in segs)
  kv_len = round(sum((n - 1) * kv for n, kv in segs) / extra) if extra else segs[-1][1] if segs else 0

  def lower(layout: Layout):
    out = {"main": lower_sampler(cfg, sampling, rows, prompt_len, layout), "decode_extra": extra,
           "layer_loop": "unrolled"}
    if segs:  # (One new token: no decode step runs.)
      out["decode"] = lower_decode_step(cfg, sampling, rows, prompt_len, kv_len, layout)
    return out
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
    parts = {"main": one(layout, k), "layer_loop": "scan"}
    if head == "lm":
      parts["logits_chunks"] = logits_chunks(cfg, layout, rows, seq_len)
    return parts | ({"flat": one(layout, 1)} if k > 1 else {})
  return lower


def logits_chunks(cfg, layout: Layout, rows: int, seq_len: int) -> int:
  """How many chunks `Transformer.token_logprobs` cuts the LM head into for `rows` x `seq_len` under
  `layout` (`logits_chunk_size`, with the layout's batch and vocab shards): the compiled tier sees
  one chunk (a scan body) and `search.estimator.logits_chunk_correction` adds the others."""
  with activation_constraints(sharding_hook(layout)):
    c = logits_chunk_size(cfg.logits_chunk, rows, seq_len, cfg.vocab_size)
  return -(-seq_len // c)


def lower_train(cfg, head: str, loss_fn, opt_cfg, batch_example: dict):
  graphdef, state = _abstract(cfg, head)
  params = nnx.state(nnx.merge(graphdef, state), nnx.Param)
  opt_state = jax.eval_shape(make_optimizer(opt_cfg).init, params)
  ts = TrainState(params, opt_state, _sds((), jnp.int32))
  rows, seq_len = batch_example["tokens"].shape

  def one(layout, k):
    fn = make_train_step(graphdef, loss_fn, opt_cfg, layout, micro_batches=k, params=params,
                         batch_example=batch_example)
    return fn.lower(ts, batch_example)

  def lower(layout: Layout):
    k = layout.strategy.micro_batches
    parts = {"main": one(layout, k), "layer_loop": "scan"}
    if head == "lm":
      parts["logits_chunks"] = logits_chunks(cfg, layout, rows, seq_len)
    return parts | ({"flat": one(layout, 1)} if k > 1 else {})
  return lower


def ppo_call_specs(exp: Experiment, *, lowerable: bool = True,
                   platform: str | None = None) -> tuple[Graph, dict[str, CallSpec]]:
  """The PPO graph of `exp` and a CallSpec per call (with lower callbacks when `lowerable`).

  platform: the backend the plan is for ("gpu", "cpu", ...; default this machine's). It decides what
  the analytic tier is told of the kernels that run there: the cache slots a decode step reads
  (`decode_kv_slots`) and whether full-sequence attention is fused (`fused_attention`). The compiled
  tier prices what this machine's backend compiles.
  """
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
    common = dict(name=c.name, model=c.model, shape=shape, head=head,
                  fused_attention=fused_attention(cfg, platform))
    if c.name == "actor_gen":
      specs[c.name] = CallSpec(kind="generate", batch=rows, prompt_len=p, new_tokens=m,
                               key=f"sampling={sampling}", decode_kv_slots=decode_kv_slots(cfg, sampling, p, platform),
                               **common,
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


def call_specs(exp: Experiment, *, lowerable: bool = True,
               platform: str | None = None) -> tuple[Graph, dict[str, CallSpec]]:
  """The graph and CallSpecs of `exp` (see `ppo_call_specs`)."""
  if exp.algorithm != "ppo":
    raise ValueError(f"config.algorithm={exp.algorithm!r}: the planner knows the PPO graph only so far")
  return ppo_call_specs(exp, lowerable=lowerable, platform=platform)

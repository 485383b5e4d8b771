"""Inference calls: per-token log-probs (actor, ref) and per-token values / sequence scores
(critic, reward), micro-batched, jitted under a Layout.

Alignment (the same as `generation.Rollout.logprobs`): for tokens [B, T],
`logprobs[:, t] = log p(tokens[:, t+1] | tokens[:, :t+1])` for t < T-1, and the last column is 0.
So for a rollout, `logprobs(...)[rollout.logprob_mask]` and `rollout.logprobs[rollout.logprob_mask]`
compare elementwise. Log-probs are float32 `log_softmax(logits / temperature)`
(`Transformer.token_logprobs`, computed in chunks of positions), from the same hidden states and
the same parameter cast (`_calls.compute_params`) as generation.

`values[:, t]` is the scalar head at token t; `scores[b]` is the value at row b's last real token
(the usual reward-model / sequence-score convention).

Micro-batches: the batch is split into `micro_batches` interleaved groups (row i in group i % k)
and a `lax.scan` runs them one after another, bounding activation memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from real_jax._calls import batch_sharding, cached, compute_params, shape_key, sharding_hook, split_model
from real_jax.models.transformer import activation_constraints
from sharding import Layout, shardings_for


def _micro(fn, k: int, *arrays):
  """Runs fn over k interleaved micro-batches of the leading axis with lax.scan; concatenates."""
  if k == 1:
    return fn(*arrays)
  b = arrays[0].shape[0]
  if b % k:
    raise ValueError(f"batch {b} does not divide into micro_batches={k}")
  split = [jnp.swapaxes(a.reshape(b // k, k, *a.shape[1:]), 0, 1) for a in arrays]
  _, out = jax.lax.scan(lambda c, xs: (c, fn(*xs)), None, split)
  return jax.tree.map(lambda o: jnp.swapaxes(o, 0, 1).reshape(b, *o.shape[2:]), out)


def _forward(graphdef, state, tokens, mask):
  model = nnx.merge(graphdef, state)
  return model(tokens, attention_mask_BT=mask)


def _logprob_fn(graphdef, layout, temperature, k):
  def run(state, tokens, mask):
    with activation_constraints(sharding_hook(layout)):
      cfg = nnx.merge(graphdef, state).cfg
      st = compute_params(state, cfg.dtype)
      model = nnx.merge(graphdef, st)
      return _micro(lambda t, m: model.token_logprobs(t, m, temperature=temperature), k, tokens, mask)
  return run


def _value_fn(graphdef, layout, k):
  def run(state, tokens, mask):
    with activation_constraints(sharding_hook(layout)):
      cfg = nnx.merge(graphdef, state).cfg
      st = compute_params(state, cfg.dtype)
      values = _micro(lambda t, m: _forward(graphdef, st, t, m), k, tokens, mask)
      t_idx = jnp.arange(tokens.shape[1])
      last = jnp.max(jnp.where(mask, t_idx, 0), axis=1)
      scores = jnp.take_along_axis(values, last[:, None], axis=1)[:, 0]
      return values, scores
  return run


def _jitted(kind, graphdef, state, tokens_BT, layout, builder, n_out):
  key = (kind, graphdef, layout, tuple(tokens_BT.shape), shape_key(state))

  def build():
    st_sh = shardings_for(state, layout)
    bsh = batch_sharding(layout, tuple(tokens_BT.shape))
    out = bsh if n_out == 1 else (bsh, batch_sharding(layout, (tokens_BT.shape[0],)))
    return jax.jit(builder(), in_shardings=(st_sh, bsh, bsh), out_shardings=out)

  return cached(key, build)


def _inputs(tokens_BT, mask_BT):
  tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
  mask_BT = jnp.ones(tokens_BT.shape, bool) if mask_BT is None else jnp.asarray(mask_BT, bool)
  return tokens_BT, mask_BT


def logprobs(model, tokens_BT, mask_BT=None, layout: Layout | None = None, *, temperature: float = 1.0,
             micro_batches: int | None = None) -> jax.Array:
  """[B, T] float32 shifted per-token log-probs of `tokens_BT` under an lm-head model.

  model: a Transformer or (graphdef, state). micro_batches defaults to layout.strategy.micro_batches.
  """
  layout = layout if layout is not None else Layout.on(0)
  graphdef, state = split_model(model)
  tokens_BT, mask_BT = _inputs(tokens_BT, mask_BT)
  k = micro_batches or layout.strategy.micro_batches
  fn = _jitted(("logprobs", float(temperature), k), graphdef, state, tokens_BT, layout,
               lambda: _logprob_fn(graphdef, layout, float(temperature), k), 1)
  return fn(state, tokens_BT, mask_BT)


def values(model, tokens_BT, mask_BT=None, layout: Layout | None = None, *,
           micro_batches: int | None = None) -> tuple[jax.Array, jax.Array]:
  """(values [B, T], scores [B]) of a scalar-head model (critic or reward)."""
  layout = layout if layout is not None else Layout.on(0)
  graphdef, state = split_model(model)
  tokens_BT, mask_BT = _inputs(tokens_BT, mask_BT)
  k = micro_batches or layout.strategy.micro_batches
  fn = _jitted(("values", k), graphdef, state, tokens_BT, layout, lambda: _value_fn(graphdef, layout, k), 2)
  return fn(state, tokens_BT, mask_BT)

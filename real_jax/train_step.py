"""A generic, jitted train step for any loss function, under a Layout.

    state = init_train_state(model, opt_cfg, layout)
    step = make_train_step(graphdef, loss_fn, opt_cfg, layout, micro_batches=4)
    state, metrics = step(state, batch)          # the old state is donated

* `loss_fn(model, batch) -> (loss, aux)`: model is the Transformer (parameters already in the
  compute dtype), batch a dict of [B, ...] arrays (one micro-batch), loss a scalar, aux a dict of
  scalars. Call the model with `train=True` so the configured rematerialisation applies
  (`ModelConfig.remat`: "none", "full", "dots").
* Gradient accumulation: the batch is split into k interleaved micro-batches (row i in micro-batch
  i % k), run one after another with `lax.scan`; gradients are summed in float32, each weighted by
  the micro-batch's `aux["loss_weight"]` (default 1), and divided by the total weight. A loss that is
  a token mean returns its token count there (`algorithms.aggregation_weight`), so the update equals
  one step on the whole batch however the plan splits it. The global-norm clip acts on the
  accumulated gradient.
* Mixed precision: with `ModelConfig.dtype = "bfloat16"` and `param_dtype = "float32"` the state
  holds fp32 master parameters and fp32 AdamW moments; each step casts the parameters to bf16
  for compute (`_calls.compute_params`, the same cast generation and inference use), gradients
  come back in fp32. With both "float32" everything is fp32.
* Shardings: parameters and every optimizer slot that mirrors them follow `shardings_for(...,
  layout)` (optax states are mapped by structure: mu/nu carry the same logical axes), scalars
  (step, counters) are replicated; the batch is sharded over (data, fsdp). The state argument is
  donated: after a step the old state's buffers are deleted.
* Metrics (replicated scalars): loss, grad_norm (before clipping), lr, and the aux means.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from real_jax._calls import batch_sharding, cached, compute_params, shape_key, sharding_hook
from real_jax.models.transformer import activation_constraints
from real_jax.optim import OptimizerConfig, lr_schedule, make_optimizer
from sharding import Layout, shardings_for

LossFn = Callable[[Any, dict], tuple[jax.Array, dict]]

# A loss may return aux[LOSS_WEIGHT]: how much its micro-batch counts (e.g. its token count for a token
# mean). Accumulation then weights each micro-batch's gradient by it and divides by the total, so the update
# equals one step on the whole batch for any micro-batch split (plans change micro_batches, never the math).
LOSS_WEIGHT = "loss_weight"


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  """params: the model's nnx.State (fp32 masters in mixed precision); opt_state: optax state; step."""

  params: Any
  opt_state: Any
  step: jax.Array


def state_shardings(params: Any, opt_cfg: OptimizerConfig, layout: Layout) -> TrainState:
  """NamedShardings of a TrainState: optimizer slots mirror their parameters, scalars replicated."""
  abstract_opt = jax.eval_shape(make_optimizer(opt_cfg).init, params)
  return TrainState(shardings_for(params, layout), shardings_for(abstract_opt, layout), layout.replicated())


def step_shardings(params: Any, opt_cfg: OptimizerConfig, layout: Layout, batch_example: dict):
  """(state shardings, batch shardings) of a train step's inputs: the TrainState's (`state_shardings`) and
  the batch's, each array sharded over (data, fsdp)."""
  bsh = jax.tree.map(lambda a: batch_sharding(layout, tuple(a.shape)), batch_example)
  return state_shardings(params, opt_cfg, layout), bsh


def init_train_state(model, opt_cfg: OptimizerConfig, layout: Layout) -> TrainState:
  """A TrainState for `model` (already in `layout`, e.g. from `create_model(cfg, layout)`).

  The optimizer state is created directly in its shardings (jit with out_shardings).
  """
  params = nnx.state(model, nnx.Param)
  sh = state_shardings(params, opt_cfg, layout)
  params = jax.device_put(params, sh.params)  # no-op when already in layout
  opt_state = jax.jit(make_optimizer(opt_cfg).init, out_shardings=sh.opt_state)(params)
  return TrainState(params, opt_state, jax.device_put(jnp.zeros((), jnp.int32), sh.step))


def _split_micro(batch: dict, k: int) -> dict:
  def one(a):
    b = a.shape[0]
    if b % k:
      raise ValueError(f"train step: batch size {b} does not divide into micro_batches={k}")
    return jnp.swapaxes(a.reshape(b // k, k, *a.shape[1:]), 0, 1)
  return jax.tree.map(one, batch)


def _grads_fn(graphdef, loss_fn: LossFn, layout: Layout, k: int):
  """(params, batch) -> (grads, loss, aux): the accumulated float32 gradient over k micro-batches, weighted
  and normalised as the module docstring says (the forward and backward half of a step)."""

  def grads_of(params, batch: dict):
    with activation_constraints(sharding_hook(layout)):
      cfg = nnx.merge(graphdef, params).cfg

      def loss_of(params, mb):
        model = nnx.merge(graphdef, compute_params(params, cfg.dtype))
        loss, aux = loss_fn(model, mb)
        return loss.astype(jnp.float32), aux

      grad_fn = jax.value_and_grad(loss_of, has_aux=True)
      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

      def acc(carry, mb):
        g_sum, l_sum, a_sum, w_sum = carry
        (loss, aux), g = grad_fn(params, mb)
        aux = dict(aux)
        w = jnp.asarray(aux.pop(LOSS_WEIGHT, 1.0), jnp.float32)
        g_sum = jax.tree.map(lambda s, x: s + w * x.astype(jnp.float32), g_sum, g)
        a_sum = jax.tree.map(lambda s, x: s + w * jnp.asarray(x, jnp.float32), a_sum, aux)
        return (g_sum, l_sum + w * loss, a_sum, w_sum + w), None

      if k == 1:
        (loss, aux), grads = grad_fn(params, batch)
        aux = dict(aux)
        aux.pop(LOSS_WEIGHT, None)
        grads = jax.tree.map(lambda x: x.astype(jnp.float32), grads)
        aux = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), aux)
      else:
        mbs = _split_micro(batch, k)
        first = jax.tree.map(lambda a: a[0], mbs)
        aux_shape = dict(jax.eval_shape(lambda: loss_of(params, first)[1]))
        aux_shape.pop(LOSS_WEIGHT, None)
        aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), aux_shape)
        carry0 = (zeros, jnp.zeros((), jnp.float32), aux0, jnp.zeros((), jnp.float32))
        (grads, loss, aux, w_sum), _ = jax.lax.scan(acc, carry0, mbs)
        w_sum = jnp.maximum(w_sum, jnp.finfo(jnp.float32).tiny)  # All-empty batch: zero update.
        grads = jax.tree.map(lambda g: g / w_sum, grads)
        loss, aux = loss / w_sum, jax.tree.map(lambda a: a / w_sum, aux)
      return grads, loss, aux

  return grads_of


def _update_fn(opt_cfg: OptimizerConfig):
  """(state, grads) -> (state, grad_norm): the global-norm clip and AdamW (the optimizer half of a step)."""
  opt = make_optimizer(opt_cfg)

  def update(state: TrainState, grads):
    grad_norm = optax.tree.norm(grads) if hasattr(optax, "tree") else optax.global_norm(grads)
    updates, opt_state = opt.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = jax.tree.map(lambda new, old: new.astype(old.dtype), params, state.params)
    return TrainState(params, opt_state, state.step + 1), grad_norm

  return update


def _step_fn(graphdef, loss_fn: LossFn, opt_cfg: OptimizerConfig, layout: Layout, k: int):
  grads_of, update = _grads_fn(graphdef, loss_fn, layout, k), _update_fn(opt_cfg)
  sched = lr_schedule(opt_cfg)

  def step(state: TrainState, batch: dict):
    grads, loss, aux = grads_of(state.params, batch)
    new, grad_norm = update(state, grads)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": sched(state.step), **aux}
    return new, metrics

  return step


def make_train_step(graphdef, loss_fn: LossFn, opt_cfg: OptimizerConfig, layout: Layout, *,
                    micro_batches: int | None = None, params: Any = None, batch_example: dict | None = None):
  """A jitted `(state, batch) -> (state, metrics)` with explicit shardings, the state donated.

  params: the (abstract or concrete) parameter state, used for the shardings; batch_example: a dict
  of arrays or ShapeDtypeStructs giving the batch shapes (both keys of the cache). micro_batches
  defaults to layout.strategy.micro_batches. Cached by (graphdef, loss_fn, opt_cfg, layout, k, shapes).
  """
  if params is None or batch_example is None:
    raise ValueError("make_train_step needs params= (for shardings) and batch_example= (for shapes)")
  k = micro_batches or layout.strategy.micro_batches
  key = ("train_step", graphdef, loss_fn, opt_cfg, layout, k, shape_key(params), shape_key(batch_example))

  def build():
    sh, bsh = step_shardings(params, opt_cfg, layout, batch_example)
    return jax.jit(_step_fn(graphdef, loss_fn, opt_cfg, layout, k), in_shardings=(sh, bsh),
                   out_shardings=(sh, layout.replicated()), donate_argnames=("state",))

  return cached(key, build)


def make_train_parts(graphdef, loss_fn: LossFn, opt_cfg: OptimizerConfig, layout: Layout, *,
                     micro_batches: int | None = None, params: Any = None, batch_example: dict | None = None):
  """The step's two halves as separate jitted programs, to time where a step's time goes (bench/train.py
  --parts): `grads(params, batch) -> (grads, loss, aux)`, the float32 gradients sharded like the
  parameters, and `update(state, grads) -> (state, grad_norm)`, the state donated. `update(state,
  grads(state.params, batch)[0])` gives the state `make_train_step`'s program does, which runs both
  halves in one program (so XLA may overlap them; the parts' sum is not the step's time). Not cached."""
  if params is None or batch_example is None:
    raise ValueError("make_train_parts needs params= (for shardings) and batch_example= (for shapes)")
  k = micro_batches or layout.strategy.micro_batches
  sh, bsh = step_shardings(params, opt_cfg, layout, batch_example)
  grads = jax.jit(_grads_fn(graphdef, loss_fn, layout, k), in_shardings=(sh.params, bsh),
                  out_shardings=(sh.params, layout.replicated(), layout.replicated()))
  update = jax.jit(_update_fn(opt_cfg), in_shardings=(sh, sh.params), out_shardings=(sh, layout.replicated()),
                   donate_argnames=("state",))
  return grads, update


def train_step(graphdef, loss_fn: LossFn, opt_cfg: OptimizerConfig, layout: Layout, state: TrainState,
               batch: dict, *, micro_batches: int | None = None) -> tuple[TrainState, dict]:
  """One step (builds or fetches the cached jitted step for these shapes). Donates `state`."""
  fn = make_train_step(graphdef, loss_fn, opt_cfg, layout, micro_batches=micro_batches, params=state.params,
                       batch_example=batch)
  return fn(state, batch)


def next_token_loss(model, batch: dict) -> tuple[jax.Array, dict]:
  """Mean cross-entropy of tokens[:, 1:] where mask[:, 1:] (SFT-style), per-example mean then batch mean.

  batch: {"tokens": [B, T] int, "mask": [B, T] bool}. Averaging per example first makes the loss a
  mean over rows, so micro-batch accumulation reproduces the full-batch gradient exactly.
  """
  tokens, mask = batch["tokens"], batch["mask"].astype(bool)
  nll = -model.token_logprobs(tokens, mask, train=True)[:, :-1]
  m = mask[:, 1:].astype(jnp.float32)
  per_row = jnp.sum(nll * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
  loss = jnp.mean(per_row)
  return loss, {"tokens": jnp.sum(m)}

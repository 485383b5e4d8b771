"""Train step: overfitting, gradient accumulation, sharded == single device, donation, mixed
precision master weights, the learning-rate schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from real_jax.models import create_model, get_config
from real_jax.optim import OptimizerConfig, lr_schedule
from real_jax.train_step import init_train_state, next_token_loss, train_step

CFG = get_config("tiny")
OPT = OptimizerConfig(lr=3e-3, warmup_steps=1, decay_steps=50, clip_norm=1.0)
from sharding import Layout  # noqa: E402


def _batch(b=8, t=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, size=(b, t)).astype(np.int32)
  mask = np.ones((b, t), bool)
  mask[1, :4] = False
  mask[5, :7] = False
  return {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask)}


def _params(state):
  return [np.array(x, copy=True) for x in jax.tree.leaves(state.params)]  # no view: keeps donation possible


def _run(layout, steps, micro_batches=1, cfg=CFG, snapshot_at=2):
  """Trains `steps` steps on one batch; returns (params after `snapshot_at` steps, losses, state)."""
  m = create_model(cfg, layout, seed=4)
  g = nnx.graphdef(m)
  st = init_train_state(m, OPT, layout)
  losses, snap = [], None
  for i in range(steps):
    old = jax.tree.leaves(st)
    st, met = train_step(g, next_token_loss, OPT, layout, st, _batch(), micro_batches=micro_batches)
    assert all(x.is_deleted() for x in old if x.ndim)  # the old state was donated
    losses.append((float(met["loss"]), float(met["grad_norm"])))
    if i + 1 == snapshot_at:
      snap = _params(st)
  return snap, np.array(losses), st


@pytest.fixture(scope="module")
def single_run():
  return _run(Layout.on(0), 2)


@pytest.fixture(scope="module")
def accumulated_run():
  return _run(Layout.on(0), 12, micro_batches=4)


def test_loss_decreases_on_overfit_batch(accumulated_run):
  losses = accumulated_run[1][:, 0]
  assert losses[-1] < 0.6 * losses[0], losses


# Parameters after two AdamW steps: Adam divides by sqrt(v), so a gradient entry near zero turns
# an fp32 rounding difference into a visible update difference for a handful of entries; the
# loss and gradient norm are compared tightly, the parameters at a few percent of one step (lr 3e-3).
PARAM_ATOL = 1e-4


def test_grad_accumulation_matches_full_batch(single_run, accumulated_run):
  np.testing.assert_allclose(accumulated_run[1][:2], single_run[1], rtol=1e-5)
  for a, b in zip(accumulated_run[0], single_run[0]):
    np.testing.assert_allclose(a, b, atol=PARAM_ATOL)


def test_sharded_step_equals_single_device(single_run):
  layout = Layout.on(0, data=2, fsdp=2, tensor=2)
  snap, losses, st = _run(layout, 2)
  np.testing.assert_allclose(losses, single_run[1], rtol=1e-5)
  for a, b in zip(snap, single_run[0]):
    np.testing.assert_allclose(a, b, atol=PARAM_ATOL)
  mu = st.opt_state[1][0].mu
  assert jax.tree.leaves(mu)[0].sharding == jax.tree.leaves(st.params)[0].sharding


def test_mixed_precision_keeps_fp32_masters():
  layout = Layout.on(0, fsdp=2)
  cfg = CFG.replace(dtype="bfloat16", param_dtype="float32")
  _, losses, st = _run(layout, 1, cfg=cfg, snapshot_at=1)
  leaves = jax.tree.leaves(st.params) + [x for x in jax.tree.leaves(st.opt_state) if x.ndim]
  assert all(x.dtype == jnp.float32 for x in leaves)  # fp32 masters and moments
  assert np.isfinite(losses).all() and int(st.step) == 1


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_lr_schedule_matches_numpy(decay):
  cfg = OptimizerConfig(lr=1e-3, warmup_steps=10, decay_steps=100, decay=decay, end_lr_ratio=0.1)
  sched = lr_schedule(cfg)
  steps = np.arange(0, 130)
  got = np.array([float(sched(s)) for s in steps])
  t = np.clip(steps - 10, 0, 100) / 100
  after = {"cosine": 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + np.cos(np.pi * t)),
           "linear": 1e-3 + (1e-4 - 1e-3) * t, "constant": np.full_like(t, 1e-3)}[decay]
  want = np.where(steps < 10, 1e-3 * steps / 10, after)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)


def _token_mean_loss(weighted, model, batch):
  """Token-mean NLL over a ragged loss mask; with `weighted`, reports its token count as loss_weight."""
  from real_jax.algorithms import aggregation_weight
  from real_jax.train_step import LOSS_WEIGHT
  logits = model(batch["tokens"], attention_mask_BT=batch["mask"], train=True)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
  m = batch["loss_mask"][:, 1:].astype(jnp.float32)
  loss = jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)
  return loss, ({LOSS_WEIGHT: aggregation_weight(m, "token_mean")} if weighted else {})




def test_token_mean_accumulation_is_independent_of_the_split():
  """Plans change micro_batches; with loss_weight the step's loss and gradient must not change."""
  import functools
  batch = _batch()
  lm = np.zeros((8, 16), bool)
  for row, n in enumerate([15, 2, 9, 1, 12, 0, 5, 15]):  # Ragged responses, one empty row.
    lm[row, 16 - n:] = True
  batch["loss_mask"] = jnp.asarray(lm)
  layout = Layout.on(0)
  out = {}
  for weighted in (True, False):
    fn = functools.partial(_token_mean_loss, weighted)
    for k in (1, 4):
      m = create_model(CFG, layout, seed=4)
      st = init_train_state(m, OPT, layout)
      _, met = train_step(nnx.graphdef(m), fn, OPT, layout, st, batch, micro_batches=k)
      out[weighted, k] = (float(met["loss"]), float(met["grad_norm"]))
  np.testing.assert_allclose(out[True, 4], out[True, 1], rtol=1e-5)
  # Without the weight, the mean of per-micro-batch token means differs: the test can tell.
  assert abs(out[False, 4][1] - out[False, 1][1]) > 1e-3 * out[False, 1][1], out


def test_train_parts_compose_to_the_step():
  """make_train_parts (bench/train.py --parts): update(state, grads(params, batch)) is the fused step's state,
  sharded (fsdp=2 x tensor=2), with 2 micro-batches; the update donates the state."""
  from real_jax.train_step import make_train_parts, make_train_step
  layout = Layout.on(0, fsdp=2, tensor=2)
  g = nnx.graphdef(create_model(CFG, layout, seed=4))
  b = _batch()
  # Two models: a state shares its model's parameter buffers, and each program donates its state.
  st_a, st_b = (init_train_state(create_model(CFG, layout, seed=4), OPT, layout) for _ in range(2))
  init0 = np.array(jax.tree.leaves(st_b.params)[0], copy=True)
  step = make_train_step(g, next_token_loss, OPT, layout, micro_batches=2, params=st_a.params, batch_example=b)
  grads, update = make_train_parts(g, next_token_loss, OPT, layout, micro_batches=2, params=st_b.params,
                                   batch_example=b)
  for i in range(2):  # OPT warms up from lr 0: the second step moves the parameters.
    st_a, met = step(st_a, b)
    gr, loss, aux = grads(st_b.params, b)
    assert jax.tree.structure(gr) == jax.tree.structure(st_b.params)
    assert set(aux) == set(met) - {"loss", "grad_norm", "lr"}
    assert all(x.dtype == jnp.float32 and x.sharding == p.sharding
               for x, p in zip(jax.tree.leaves(gr), jax.tree.leaves(st_b.params)))
    old = [x for x in jax.tree.leaves(st_b) if x.ndim]
    st_b, gnorm = update(st_b, gr)
    assert all(x.is_deleted() for x in old)
    np.testing.assert_allclose(float(loss), float(met["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(gnorm), float(met["grad_norm"]), rtol=1e-5)
    assert int(st_b.step) == int(st_a.step) == i + 1
    for x, y in zip(_params(st_a), _params(st_b)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(_params(st_b)[0] - init0)) > 1e-4  # the update moved the parameters
  with pytest.raises(ValueError, match="make_train_parts needs params="):
    make_train_parts(g, next_token_loss, OPT, layout)

"""RLHF math in real_jax.algorithms against small NumPy references written with plain loops.

Every reference below is an independent re-derivation (per-row, per-token Python loops, branchy
case analysis where the library uses max/min), not a copy of the JAX code. Library functions are
called under jax.jit throughout, which doubles as the jit-compatibility check.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import real_jax.algorithms as A

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)


def J(fn, **static):
  return jax.jit(functools.partial(fn, **static))


def ragged_mask(rng, b, t, empty_row=True):
  """Contiguous response masks of random lengths (most start at 0, some later); one empty row."""
  m = np.zeros((b, t), np.float32)
  for i in range(b):
    n = int(rng.integers(1, t + 1))
    s = 0 if rng.random() < 0.7 else int(rng.integers(0, t - n + 1))
    m[i, s : s + n] = 1.0
  if empty_row:
    m[int(rng.integers(0, b))] = 0.0
  return m


def batch(seed, b=4, t=6, empty_row=True):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
  return dict(
    rng=rng,
    mask=ragged_mask(rng, b, t, empty_row),
    logp=-np.abs(f(b, t)) - 0.1,
    old_logp=-np.abs(f(b, t)) - 0.1,
    ref_logp=-np.abs(f(b, t)) - 0.1,
    values=f(b, t),
    adv=f(b, t),
    scores=f(b),
    no_eos=rng.random(b) < 0.5,
  )


# ------------------------------------------------------------------ NumPy references (loops)


def ref_masked_mean(x, m):
  s, n = 0.0, 0.0
  for i in range(x.shape[0]):
    for j in range(x.shape[1]):
      if m[i, j] != 0:
        s += float(x[i, j]) * float(m[i, j])
        n += float(m[i, j])
  return s / n if n else 0.0


def ref_row_means(x, m):
  return [ref_masked_mean(x[i : i + 1], m[i : i + 1]) for i in range(x.shape[0])]


def ref_aggregate(x, m, mode):
  if mode == "token_mean":
    return ref_masked_mean(x, m)
  rows = []
  for i in range(x.shape[0]):
    n = sum(1 for j in range(x.shape[1]) if m[i, j])
    if n == 0:
      continue
    s = sum(float(x[i, j]) for j in range(x.shape[1]) if m[i, j])
    rows.append(s / n if mode == "seq_mean_token_mean" else s)
  return sum(rows) / len(rows) if rows else 0.0


def ref_gae(r, v, m, gamma, lam):
  b, t = r.shape
  adv = np.zeros((b, t))
  for i in range(b):
    last = 0.0
    for j in reversed(range(t)):
      if not m[i, j]:
        last = 0.0
        continue
      nxt_in = j + 1 < t and m[i, j + 1]
      next_v = v[i, j + 1] if nxt_in else 0.0
      delta = r[i, j] + gamma * next_v - v[i, j]
      last = delta + gamma * lam * (last if nxt_in else 0.0)
      adv[i, j] = last
  ret = np.where(m != 0, adv + v, 0.0)
  return adv, ret


def ref_policy_token(logp, old, a, eps, eps_hi=None, dual=None):
  """Case analysis of the clipped surrogate for one token (no max/min of the two surrogates)."""
  eps_hi = eps if eps_hi is None else eps_hi
  r = math.exp(logp - old)
  if a >= 0:
    loss = -a * min(r, 1 + eps_hi)
    clipped = a > 0 and r > 1 + eps_hi
  else:
    loss = -a * max(r, 1 - eps)
    clipped = r < 1 - eps
    if dual is not None and loss > -dual * a:
      loss = -dual * a
  return loss, clipped


def ref_last_index(m_row):
  idx = [j for j in range(len(m_row)) if m_row[j]]
  return idx[-1] if idx else None


# ------------------------------------------------------------------ masked reductions


@given(seed=st.integers(0, 10_000))
@SETTINGS
def test_masked_mean_sum_var_match_loops_and_ignore_masked_entries(seed):
  d = batch(seed)
  x, m = d["values"], d["mask"]
  got = float(jax.jit(A.masked_mean)(x, m))
  np.testing.assert_allclose(got, ref_masked_mean(x, m), rtol=1e-5, atol=1e-6)
  rows = jax.jit(A.masked_mean, static_argnums=2)(x, m, 1)
  np.testing.assert_allclose(rows, ref_row_means(x, m), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(A.masked_sum(x, m)), sum(x[m != 0]), rtol=1e-5, atol=1e-5)
  sel = x[m != 0]
  np.testing.assert_allclose(float(A.masked_var(x, m)), np.var(sel), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(A.masked_var(x, m, unbiased=True)), np.var(sel, ddof=1), rtol=1e-4, atol=1e-6)
  poisoned = np.where(m != 0, x, np.nan).astype(np.float32)  # masked entries must be dropped exactly
  assert float(A.masked_mean(poisoned, m)) == got
  assert np.all(np.isfinite(A.masked_mean(poisoned, m, axis=1)))


def test_masked_mean_fully_masked_is_zero_not_nan():
  x = jnp.ones((2, 3))
  m = jnp.zeros((2, 3))
  assert float(A.masked_mean(x, m)) == 0.0
  assert np.all(np.asarray(A.masked_mean(x, m, axis=1)) == 0.0)
  assert float(A.masked_var(x, m)) == 0.0
  assert np.all(np.asarray(A.masked_whiten(x, m)) == 0.0)
  g = jax.grad(lambda y: A.masked_mean(y, m))(x)
  assert np.all(np.isfinite(g))


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_loop_reference(shift_mean):
  d = batch(1)
  x, m = d["values"] * 3 + 2, d["mask"]
  vals = [float(x[i, j]) for i in range(4) for j in range(6) if m[i, j]]
  mu = sum(vals) / len(vals)
  var = sum((v - mu) ** 2 for v in vals) / len(vals)
  want = np.zeros_like(x)
  for i in range(4):
    for j in range(6):
      if m[i, j]:
        want[i, j] = (x[i, j] - mu) / math.sqrt(var + 1e-8) + (0 if shift_mean else mu)
  got = J(A.masked_whiten, shift_mean=shift_mean)(x, m)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", A.LOSS_AGGREGATIONS)
def test_aggregate_loss_modes(mode):
  d = batch(2)
  got = float(J(A.aggregate_loss, mode=mode)(d["values"], d["mask"]))
  np.testing.assert_allclose(got, ref_aggregate(d["values"], d["mask"], mode), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="unknown loss aggregation 'nope'"):
    A.aggregate_loss(d["values"], d["mask"], "nope")


def test_last_token_helpers_and_sequence_logprobs():
  d = batch(3)
  m = d["mask"]
  oh = np.asarray(jax.jit(A.last_token_onehot)(m))
  lv = np.asarray(jax.jit(A.last_token_value)(d["values"], m))
  for i in range(4):
    k = ref_last_index(m[i])
    want = np.zeros(6)
    if k is not None:
      want[k] = 1
    np.testing.assert_array_equal(oh[i], want)
    np.testing.assert_allclose(lv[i], 0.0 if k is None else d["values"][i, k], rtol=1e-6)
  np.testing.assert_allclose(
    jax.jit(A.sequence_logprobs)(d["logp"], m), [sum(d["logp"][i][m[i] != 0]) for i in range(4)], rtol=1e-5, atol=1e-6
  )


def test_entropy_from_logits_matches_loop_and_is_masked():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(3, 4, 5)).astype(np.float32) * 3
  m = ragged_mask(rng, 3, 4)
  want = np.zeros((3, 4))
  for i in range(3):
    for j in range(4):
      z = np.exp(logits[i, j] - logits[i, j].max())
      p = z / z.sum()
      want[i, j] = -sum(pk * math.log(pk) for pk in p)
  np.testing.assert_allclose(jax.jit(A.entropy_from_logits)(logits), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(jax.jit(A.masked_entropy)(logits, m)), ref_masked_mean(want, m), rtol=1e-5)
  uniform = A.entropy_from_logits(jnp.zeros((1, 1, 5)))
  np.testing.assert_allclose(uniform, [[math.log(5)]], rtol=1e-6)


# ------------------------------------------------------------------ KL estimators and controllers


def test_kl_estimators_known_values():
  lp, ref = jnp.array([[-1.0, -2.0, -0.5]]), jnp.array([[-2.0, -1.0, -0.5]])
  np.testing.assert_allclose(A.get_kl("k1")(lp, ref), [[1.0, -1.0, 0.0]])
  np.testing.assert_allclose(A.get_kl("k2")(lp, ref), [[0.5, 0.5, 0.0]])
  # k3 with r = exp(ref - logp): r - 1 - log r
  np.testing.assert_allclose(A.get_kl("k3")(lp, ref), [[math.exp(-1) - 1 + 1, math.exp(1) - 1 - 1, 0.0]], rtol=1e-6)
  with pytest.raises(KeyError, match=r"unknown kl estimator 'k4'; known: k1, k2, k3"):
    A.get_kl("k4")


@given(lp=st.floats(-30, 0), ref=st.floats(-30, 0))
@SETTINGS
def test_k2_k3_nonnegative(lp, ref):
  a, b = jnp.float32(lp), jnp.float32(ref)
  assert float(A.kl_k3(a, b)) >= 0.0
  assert float(A.kl_k2(a, b)) >= 0.0


def test_k1_k3_unbiased_for_kl_pi_ref_on_samples():
  rng = np.random.default_rng(0)
  pi = rng.dirichlet(np.ones(6))
  ref = rng.dirichlet(np.ones(6))
  true_kl = sum(p * math.log(p / q) for p, q in zip(pi, ref))
  y = rng.choice(6, size=200_000, p=pi)
  lp, lr = np.log(pi)[y].astype(np.float32), np.log(ref)[y].astype(np.float32)
  k1, k2, k3 = (float(jnp.mean(A.get_kl(k)(lp, lr))) for k in ("k1", "k2", "k3"))
  assert abs(k1 - true_kl) < 0.03 * max(true_kl, 0.1) + 0.01
  assert abs(k3 - true_kl) < 0.03 * max(true_kl, 0.1) + 0.01
  assert k2 >= 0


def test_adaptive_kl_controller_moves_coefficient_the_right_way():
  c = A.AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
  up = jax.jit(c.update)
  k0 = c.init()
  hi = float(up(k0, 9.0, 256))  # KL above target -> larger coefficient
  lo = float(up(k0, 3.0, 256))  # below -> smaller
  np.testing.assert_allclose(hi, 0.1 * (1 + 0.2 * 256 / 10000), rtol=1e-6)  # error 0.5 clipped to 0.2
  np.testing.assert_allclose(lo, 0.1 * (1 - 0.2 * 256 / 10000), rtol=1e-6)
  np.testing.assert_allclose(float(up(k0, 6.6, 100)), 0.1 * (1 + 0.1 * 100 / 10000), rtol=1e-5)
  assert float(up(k0, 6.0, 100)) == pytest.approx(0.1)
  f = A.FixedKLController(0.3)
  assert float(jax.jit(f.update)(f.init(), 100.0, 5)) == pytest.approx(0.3)
  assert isinstance(A.PPOConfig(kl_target=6.0).kl_controller(), A.AdaptiveKLController)
  with pytest.raises(ValueError, match="AdaptiveKLController.target"):
    A.AdaptiveKLController(0.1, 0.0, 10)


def test_reward_scaling_and_no_eos_penalty():
  s = jnp.array([-5.0, 0.5, 5.0])
  np.testing.assert_allclose(A.scale_and_clip_rewards(s, scale=2.0, bias=1.0, clip=3.0), [-3.0, 3.0, 3.0])
  np.testing.assert_allclose(A.scale_and_clip_rewards(s, scale=0.5), [-2.5, 0.25, 2.5])
  np.testing.assert_allclose(A.apply_no_eos_penalty(s, jnp.array([True, False, True]), 1.5), [-6.5, 0.5, 3.5])


# ------------------------------------------------------------------ PPO


def test_compute_token_rewards_match_loop_reference():
  d = batch(5)
  kw = dict(kl_in_reward=True, kl_estimator="k1", reward_scale=2.0, reward_bias=0.5, reward_clip=1.5)
  kw["no_eos_penalty"] = 0.7
  r, kl = J(A.compute_token_rewards, **kw)(d["scores"], d["logp"], d["ref_logp"], d["mask"], d["no_eos"], 0.1)
  m = d["mask"]
  for i in range(4):
    k = ref_last_index(m[i])
    for j in range(6):
      want_kl = (d["logp"][i, j] - d["ref_logp"][i, j]) if m[i, j] else 0.0
      want = -0.1 * want_kl
      if j == k:
        want += min(max((d["scores"][i] + 0.5) * 2.0, -1.5), 1.5) - 0.7 * d["no_eos"][i]
      np.testing.assert_allclose(r[i, j], want, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(kl[i, j], want_kl, rtol=1e-5, atol=1e-6)
  r2, _ = J(A.compute_token_rewards, kl_in_reward=False)(d["scores"], d["logp"], d["ref_logp"], m, d["no_eos"], 0.1)
  want_sums = [d["scores"][i] if m[i].any() else 0 for i in range(4)]  # only the score, once, on the last token
  np.testing.assert_allclose(np.sum(np.asarray(r2), 1), want_sums, rtol=1e-5)


@given(
  seed=st.integers(0, 10_000),
  gamma=st.sampled_from([1.0, 0.99, 0.5]),
  lam=st.sampled_from([1.0, 0.95, 0.0]),
)
@SETTINGS
def test_gae_matches_backward_loop(seed, gamma, lam):
  d = batch(seed)
  r = d["adv"]  # any per-token rewards
  adv, ret = _gae_jit(r, d["values"], d["mask"], gamma=gamma, lam=lam)
  want_adv, want_ret = ref_gae(r, d["values"], d["mask"], gamma, lam)
  np.testing.assert_allclose(adv, want_adv, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ret, want_ret, rtol=1e-4, atol=1e-5)


_gae_jit = jax.jit(A.gae_advantages)  # gamma/lam traced: one compile per shape


def test_gae_special_cases():
  # lam = 1, gamma = 1: A_t = sum_{s>=t} r_s - V_t (Monte Carlo); returns = reward-to-go.
  d = batch(6)
  m = d["mask"]
  adv, ret = A.gae_advantages(d["adv"], d["values"], m, gamma=1.0, lam=1.0)
  rtg = A.discounted_returns(d["adv"], m, gamma=1.0)
  for i in range(4):
    for j in range(6):
      want = sum(d["adv"][i, k] for k in range(j, 6) if m[i, k]) if m[i, j] else 0.0
      np.testing.assert_allclose(rtg[i, j], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, rtg, rtol=1e-5, atol=1e-5)
  # garbage beyond the mask must not leak (no bootstrap from padded values)
  v2 = np.where(m != 0, d["values"], 1e6).astype(np.float32)
  np.testing.assert_allclose(A.gae_advantages(d["adv"], v2, m, gamma=0.9, lam=0.8)[0],
                             A.gae_advantages(d["adv"], d["values"], m, gamma=0.9, lam=0.8)[0])  # fmt: skip


def test_ppo_advantages_whitened_over_mask():
  d = batch(7)
  cfg = A.PPOConfig(gamma=0.99, lam=0.95)
  args = (d["scores"], d["logp"], d["ref_logp"], d["values"], d["mask"], d["no_eos"], 0.05)
  out = J(A.ppo_advantages, config=cfg)(*args)
  m = d["mask"]
  sel = np.asarray(out["advantages"])[m != 0]
  np.testing.assert_allclose(sel.mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(sel.std(), 1.0, rtol=1e-4)
  assert np.all(np.asarray(out["advantages"])[m == 0] == 0)
  r, _ = A.compute_token_rewards(d["scores"], d["logp"], d["ref_logp"], m, d["no_eos"], 0.05)
  _, want_ret = ref_gae(np.asarray(r), d["values"], m, 0.99, 0.95)
  np.testing.assert_allclose(out["returns"], want_ret, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["mean_kl"], ref_masked_mean(d["logp"] - d["ref_logp"], m), rtol=1e-5)


@given(seed=st.integers(0, 10_000), dual=st.sampled_from([None, 3.0]), eps_hi=st.sampled_from([None, 0.28]))
@SETTINGS
def test_clipped_policy_loss_matches_case_analysis(seed, dual, eps_hi):
  d = batch(seed, 4, 6)
  m = d["mask"]
  logp = d["old_logp"] + d["rng"].normal(size=m.shape).astype(np.float32) * 0.5  # ratios on both sides
  loss, stats = _policy_jits[(dual, eps_hi)](logp, d["old_logp"], d["adv"], m)
  per, clip = np.zeros(m.shape), np.zeros(m.shape)
  for i in range(4):
    for j in range(6):
      per[i, j], clip[i, j] = ref_policy_token(logp[i, j], d["old_logp"][i, j], d["adv"][i, j], 0.2, eps_hi, dual)
  np.testing.assert_allclose(float(loss), ref_masked_mean(per, m), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(stats["clip_frac"]), ref_masked_mean(clip, m), atol=1e-6)
  garbage = np.where(m != 0, logp, 40.0).astype(np.float32)  # exp(40 - old) is huge but finite
  loss_g, stats_g = _policy_jits[(dual, eps_hi)](garbage, d["old_logp"], d["adv"], m)
  assert float(loss_g) == float(loss) and float(stats_g["clip_frac"]) == float(stats["clip_frac"])
  lr = logp - d["old_logp"]
  np.testing.assert_allclose(float(stats["approx_kl"]), ref_masked_mean(np.exp(lr) - 1 - lr, m), rtol=1e-4, atol=1e-6)


_policy_jits = {
  (dual, hi): J(A.clipped_policy_loss, clip_eps=0.2, dual_clip=dual, clip_eps_high=hi)
  for dual in (None, 3.0)
  for hi in (None, 0.28)
}


_clip_value_and_grad = {
  dual: jax.jit(jax.value_and_grad(J(A.clipped_policy_loss, clip_eps=0.2, dual_clip=dual), has_aux=True))
  for dual in (None, 3.0)
}


@pytest.mark.parametrize(
  "ratio,adv,dual,want_loss,want_grad_zero,want_clipped",
  [
    (1.1, 1.0, None, -1.1, False, False),  # inside the clip: plain surrogate
    (1.5, 1.0, None, -1.2, True, True),  # A > 0, ratio above 1 + eps: clipped, no gradient
    (0.5, 1.0, None, -0.5, False, False),  # A > 0, ratio below 1 - eps: unclipped (pessimistic)
    (0.5, -1.0, None, 0.8, True, True),  # A < 0, ratio below 1 - eps: clipped, no gradient
    (1.5, -1.0, None, 1.5, False, False),  # A < 0, ratio above 1 + eps: unclipped
    (5.0, -1.0, 3.0, 3.0, True, False),  # dual clip caps the loss at c |A|
    (2.0, -1.0, 3.0, 2.0, False, False),  # below the cap: unchanged
    (5.0, 1.0, 3.0, -1.2, True, True),  # dual clip only touches A < 0
  ],
)
def test_policy_clip_boundaries(ratio, adv, dual, want_loss, want_grad_zero, want_clipped):
  old = jnp.array([[-1.0]])
  a = jnp.array([[adv]])
  m = jnp.ones((1, 1))
  logp = old + math.log(ratio)
  (loss, stats), g = _clip_value_and_grad[dual](logp, old, a, m)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  assert (float(g[0, 0]) == 0.0) == want_grad_zero
  if not want_grad_zero:
    np.testing.assert_allclose(float(g[0, 0]), -adv * ratio, rtol=1e-5)
  assert float(stats["clip_frac"]) == float(want_clipped)
  if dual is not None:
    assert float(stats["dual_clip_frac"]) == float(loss == 3.0)


@pytest.mark.parametrize("clip", [None, 0.2])
def test_clipped_value_loss_matches_loop(clip):
  d = batch(8)
  m = d["mask"]
  v = d["values"]
  old = v + d["rng"].normal(size=m.shape).astype(np.float32) * 0.4
  ret = d["adv"]
  loss, stats = J(A.clipped_value_loss, value_clip_eps=clip)(v, old, ret, m)
  per, cf = np.zeros(m.shape), np.zeros(m.shape)
  for i in range(4):
    for j in range(6):
      e1 = (v[i, j] - ret[i, j]) ** 2
      if clip is None:
        per[i, j] = 0.5 * e1
        continue
      vc = min(max(v[i, j], old[i, j] - clip), old[i, j] + clip)
      e2 = (vc - ret[i, j]) ** 2
      per[i, j] = 0.5 * (e1 if e1 >= e2 else e2)
      cf[i, j] = e2 > e1
  np.testing.assert_allclose(float(loss), ref_masked_mean(per, m), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(stats["vf_clip_frac"]), ref_masked_mean(cf, m), atol=1e-6)
  cfg = A.PPOConfig(value_clip_eps=clip)
  np.testing.assert_allclose(float(J(A.ppo_critic_loss, config=cfg)(v, old, ret, m)[0]), float(loss), rtol=1e-6)


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_ppo_actor_loss_entropy_and_kl_as_loss(est):
  d = batch(9)
  m = d["mask"]
  ent = np.abs(d["values"])
  cfg = A.PPOConfig(kl_in_reward=False, kl_estimator=est, entropy_coef=0.01)
  loss, stats = J(A.ppo_actor_loss, config=cfg)(d["logp"], d["old_logp"], d["ref_logp"], d["adv"], m, 0.2, entropy=ent)
  pg = np.zeros(m.shape)
  kl = np.zeros(m.shape)
  for i in range(4):
    for j in range(6):
      pg[i, j] = ref_policy_token(d["logp"][i, j], d["old_logp"][i, j], d["adv"][i, j], 0.2)[0]
      lr = float(d["ref_logp"][i, j] - d["logp"][i, j])  # log r, r = ref / pi
      kl[i, j] = {"k1": -lr, "k2": 0.5 * lr * lr, "k3": math.exp(lr) - 1 - lr}[est]
  want = ref_masked_mean(pg, m) - 0.01 * ref_masked_mean(ent, m) + 0.2 * ref_masked_mean(kl, m)
  np.testing.assert_allclose(float(loss), want, rtol=1e-4, atol=1e-6)
  cfg_in = A.PPOConfig(kl_in_reward=True)  # KL lives in the reward: no KL term in the loss
  loss_in, st_in = A.ppo_actor_loss(d["logp"], d["old_logp"], None, d["adv"], m, 0.2, config=cfg_in)
  np.testing.assert_allclose(float(loss_in), ref_masked_mean(pg, m), rtol=1e-4, atol=1e-6)
  assert "kl_loss" not in st_in


def test_losses_finite_gradients_with_empty_row():
  d = batch(10)
  m = d["mask"].copy()
  m[:] = 0.0
  m[1, :2] = 1.0
  cfg = A.PPOConfig(kl_in_reward=False, kl_estimator="k3")
  f = lambda lp: A.ppo_actor_loss(lp, d["old_logp"], d["ref_logp"], d["adv"], m, 0.1, config=cfg)[0]  # noqa: E731
  g = jax.jit(jax.grad(f))(d["logp"])
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[m == 0] == 0)


# ------------------------------------------------------------------ GRPO


@given(seed=st.integers(0, 10_000), g=st.sampled_from([2, 4]), scale=st.booleans())
@SETTINGS
def test_grpo_advantages_loop_reference_and_group_moments(seed, g, scale):
  rng = np.random.default_rng(seed)
  b, t = 8, 6
  rewards = rng.normal(size=b).astype(np.float32) * 2
  m = ragged_mask(rng, b, t)
  got = np.asarray(_grpo_adv_jits[(g, scale)](rewards, m))
  for k in range(b // g):
    grp = [float(rewards[k * g + i]) for i in range(g)]
    mu = sum(grp) / g
    sd = math.sqrt(sum((x - mu) ** 2 for x in grp) / g)
    for i in range(g):
      want = (grp[i] - mu) / (sd + 1e-6) if scale else grp[i] - mu
      for j in range(t):
        np.testing.assert_allclose(got[k * g + i, j], want if m[k * g + i, j] else 0.0, rtol=1e-4, atol=1e-5)
  per_seq = np.asarray(A.grpo_advantages(rewards, np.ones((b, 1)), group_size=g, scale_by_std=scale))
  per_seq = per_seq[:, 0].reshape(-1, g)
  np.testing.assert_allclose(per_seq.mean(1), 0.0, atol=1e-5)
  if scale:
    np.testing.assert_allclose(per_seq.std(1), 1.0, rtol=1e-4)


_grpo_adv_jits = {(g, s): J(A.grpo_advantages, group_size=g, scale_by_std=s) for g in (2, 4) for s in (True, False)}


def test_grpo_advantages_equal_rewards_and_bad_batch():
  adv = A.grpo_advantages(jnp.ones(4), jnp.ones((4, 3)), group_size=2)
  assert np.all(np.asarray(adv) == 0)
  with pytest.raises(ValueError, match="batch 5 is not a multiple of group_size=2"):
    A.grpo_advantages(jnp.ones(5), jnp.ones((5, 3)), group_size=2)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_grpo_loss_matches_loop(agg):
  d = batch(11)
  m = d["mask"]
  adv = np.asarray(A.grpo_advantages(d["scores"], m, group_size=2))
  cfg = A.GRPOConfig(group_size=2, beta=0.04, loss_agg=agg)
  loss, stats = J(A.grpo_loss, config=cfg)(d["logp"], d["old_logp"], d["ref_logp"], adv, m)
  per = np.zeros(m.shape)
  for i in range(4):
    for j in range(6):
      lr = float(d["ref_logp"][i, j] - d["logp"][i, j])
      pg = ref_policy_token(d["logp"][i, j], d["old_logp"][i, j], adv[i, j], 0.2)[0]
      per[i, j] = pg + 0.04 * (math.exp(lr) - lr - 1)
  np.testing.assert_allclose(float(loss), ref_aggregate(per, m, agg), rtol=1e-4, atol=1e-6)
  loss0, _ = A.grpo_loss(d["logp"], d["old_logp"], None, adv, m, config=A.GRPOConfig(group_size=2, beta=0.0))
  assert np.isfinite(float(loss0))


# ------------------------------------------------------------------ ReMax, RLOO, REINFORCE


def test_remax_advantages_with_and_without_kl():
  d = batch(12)
  m = d["mask"]
  greedy = d["rng"].normal(size=4).astype(np.float32)
  kl = d["logp"] - d["ref_logp"]
  got0 = jax.jit(A.remax_advantages)(d["scores"], greedy, m)
  got1 = jax.jit(A.remax_advantages)(d["scores"], greedy, m, kl, 0.1)
  for i in range(4):
    for j in range(6):
      base = float(d["scores"][i] - greedy[i]) if m[i, j] else 0.0
      np.testing.assert_allclose(got0[i, j], base, rtol=1e-5, atol=1e-6)
      tail = sum(float(kl[i, k]) for k in range(j, 6) if m[i, k]) if m[i, j] else 0.0
      np.testing.assert_allclose(got1[i, j], base - 0.1 * tail, rtol=1e-4, atol=1e-5)


@given(seed=st.integers(0, 10_000), k=st.sampled_from([2, 3, 4]))
@SETTINGS
def test_rloo_baseline_is_leave_one_out_mean(seed, k):
  rng = np.random.default_rng(seed)
  b = 12
  rewards = rng.normal(size=b).astype(np.float32)
  m = ragged_mask(rng, b, 6)
  got = np.asarray(_rloo_jits[k](rewards, m))
  for gi in range(b // k):
    for i in range(k):
      others = [float(rewards[gi * k + j]) for j in range(k) if j != i]
      want = float(rewards[gi * k + i]) - sum(others) / len(others)
      for t in range(6):
        np.testing.assert_allclose(got[gi * k + i, t], want if m[gi * k + i, t] else 0.0, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="group_size must be >= 2"):
    A.rloo_advantages(rewards, m, group_size=1)
  # The sequence-level KL penalty: the same as leave-one-out on r_i - beta * sum_t kl_it m_it (NumPy).
  kl = rng.normal(size=(b, 6)).astype(np.float32)
  got_kl = np.asarray(_rloo_jits[k](rewards, m, kl=kl, kl_coef=0.3))
  r = rewards - 0.3 * (kl * m).sum(axis=1)
  g = r.reshape(-1, k)
  want = (g - (g.sum(axis=1, keepdims=True) - g) / (k - 1)).reshape(-1)[:, None] * (m != 0)
  np.testing.assert_allclose(got_kl, want, rtol=1e-4, atol=1e-5)


_rloo_jits = {k: J(A.rloo_advantages, group_size=k) for k in (2, 3, 4)}


def test_reinforce_loss_and_gradient():
  d = batch(13)
  m = d["mask"]
  loss, _ = J(A.reinforce_loss)(d["logp"], d["adv"], m)
  np.testing.assert_allclose(float(loss), ref_masked_mean(-d["adv"] * d["logp"], m), rtol=1e-5, atol=1e-6)
  n = m.sum()
  g = jax.grad(lambda lp: A.reinforce_loss(lp, d["adv"], m)[0])(d["logp"])
  np.testing.assert_allclose(g, np.where(m != 0, -d["adv"] / n, 0.0), rtol=1e-5, atol=1e-7)
  l2, _ = J(A.reinforce_loss, loss_agg="seq_mean_token_sum")(d["logp"], d["adv"], m)
  np.testing.assert_allclose(float(l2), ref_aggregate(-d["adv"] * d["logp"], m, "seq_mean_token_sum"), rtol=1e-5)


# ------------------------------------------------------------------ DPO, SFT, reward model


def ref_log_sigmoid(z):
  return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_dpo_loss_matches_reference(ls):
  rng = np.random.default_rng(14)
  pc, pr, rc, rr = (rng.normal(size=6).astype(np.float32) * 3 for _ in range(4))
  loss, stats = J(A.dpo_loss, beta=0.2, label_smoothing=ls)(pc, pr, rc, rr)
  per, acc = [], 0
  for i in range(6):
    h = (pc[i] - rc[i]) - (pr[i] - rr[i])
    per.append(-(1 - ls) * ref_log_sigmoid(0.2 * h) - ls * ref_log_sigmoid(-0.2 * h))
    acc += h > 0
  np.testing.assert_allclose(float(loss), sum(per) / 6, rtol=1e-5)
  np.testing.assert_allclose(float(stats["accuracy"]), acc / 6)
  np.testing.assert_allclose(float(stats["chosen_rewards"]), np.mean(0.2 * (pc - rc)), rtol=1e-5, atol=1e-6)


def test_dpo_log2_at_zero_margin_and_decreasing():
  z = jnp.zeros(3)
  loss, stats = A.dpo_loss(z, z, z, z, beta=0.1)
  np.testing.assert_allclose(float(loss), math.log(2), rtol=1e-6)
  assert float(stats["accuracy"]) == 0.0
  f = jax.jit(lambda h: A.dpo_loss(jnp.full(2, h), z[:2], z[:2], z[:2], beta=0.1)[0])
  vals = [float(f(h)) for h in (-5.0, -1.0, 0.0, 1.0, 5.0)]
  assert all(a > b for a, b in zip(vals, vals[1:]))
  ipo, _ = A.ipo_loss(z, z, z, z, beta=0.1)
  np.testing.assert_allclose(float(ipo), 25.0, rtol=1e-6)  # (0 - 1 / 0.2)^2


def test_dpo_from_token_logprobs_via_sequence_logprobs():
  d = batch(15)
  m = d["mask"]
  seq = lambda x: A.sequence_logprobs(x, m)  # noqa: E731
  loss, _ = A.dpo_loss(seq(d["logp"]), seq(d["old_logp"]), seq(d["ref_logp"]), seq(d["values"]), beta=0.1)
  hs = []
  for i in range(4):  # h = (chosen - ref_chosen) - (rejected - ref_rejected), summed over response tokens
    chosen = sum(float(d["logp"][i, j] - d["ref_logp"][i, j]) for j in range(6) if m[i, j])
    rejected = sum(float(d["old_logp"][i, j] - d["values"][i, j]) for j in range(6) if m[i, j])
    hs.append(chosen - rejected)
  np.testing.assert_allclose(float(loss), sum(-ref_log_sigmoid(0.1 * h) for h in hs) / 4, rtol=1e-5)


def test_sft_loss_matches_loop():
  d = batch(16)
  m = d["mask"]
  loss, stats = J(A.sft_loss)(d["logp"], m)
  want = ref_masked_mean(-d["logp"], m)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(stats["ppl"]), math.exp(want), rtol=1e-5)
  assert float(stats["n_tokens"]) == m.sum()
  l2, _ = J(A.sft_loss, loss_agg="seq_mean_token_mean")(d["logp"], m)
  np.testing.assert_allclose(float(l2), ref_aggregate(-d["logp"], m, "seq_mean_token_mean"), rtol=1e-5)


def test_bradley_terry_loss():
  rng = np.random.default_rng(17)
  sc, sr = rng.normal(size=8).astype(np.float32), rng.normal(size=8).astype(np.float32)
  loss, stats = jax.jit(A.bradley_terry_loss)(sc, sr)
  np.testing.assert_allclose(float(loss), sum(-ref_log_sigmoid(float(a - b)) for a, b in zip(sc, sr)) / 8, rtol=1e-5)
  np.testing.assert_allclose(float(stats["accuracy"]), np.mean([a > b for a, b in zip(sc, sr)]))
  z = jnp.zeros(2)
  np.testing.assert_allclose(float(A.bradley_terry_loss(z, z)[0]), math.log(2), rtol=1e-6)
  lm, _ = A.bradley_terry_loss(sc, sr, margin=jnp.ones(8))
  np.testing.assert_allclose(float(lm), sum(-ref_log_sigmoid(float(a - b - 1)) for a, b in zip(sc, sr)) / 8, rtol=1e-5)


def test_remaining_functions_jit_and_match_eager():
  d = batch(18)
  m, lp, ref = d["mask"], d["logp"], d["ref_logp"]
  cases = [
    (A.masked_sum, (lp, m), {}),
    (A.masked_var, (lp, m), {"unbiased": True}),
    (A.kl_k1, (lp, ref), {}),
    (A.kl_k2, (lp, ref), {}),
    (A.kl_k3, (lp, ref), {}),
    (A.scale_and_clip_rewards, (d["scores"],), {"scale": 2.0, "clip": 1.0}),
    (A.apply_no_eos_penalty, (d["scores"], d["no_eos"], 0.5), {}),
    (A.discounted_returns, (d["adv"], m), {"gamma": 0.9}),
    (A.ipo_loss, (lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1]), {"beta": 0.1}),
  ]
  for fn, args, kw in cases:
    jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7), J(fn, **kw)(*args), fn(*args, **kw)
    )


@pytest.mark.parametrize("algo", ["grpo", "rloo", "ppo"])
def test_one_token_bandit_learns(algo):
  """Signs end to end: a softmax policy over 4 one-token responses, reward 1 for token 2."""
  g, steps = 8, 15
  cfg = A.GRPOConfig(group_size=g, beta=0.0)
  ppo_cfg = A.PPOConfig(gamma=1.0, lam=1.0, kl_coef=0.0, whiten_advantages=True)
  m = jnp.ones((g, 1))

  @jax.jit
  def step(theta, y, adv):
    def loss_fn(th):
      lp = jax.nn.log_softmax(th)[y][:, None]
      if algo == "grpo":
        return A.grpo_loss(lp, jax.lax.stop_gradient(lp), None, adv, m, config=cfg)[0]
      if algo == "ppo":
        return A.ppo_actor_loss(lp, jax.lax.stop_gradient(lp), None, adv, m, 0.0, config=ppo_cfg)[0]
      return A.reinforce_loss(lp, adv, m)[0]

    return theta - 1.0 * jax.grad(loss_fn)(theta)

  ppo_adv, z = J(A.ppo_advantages, config=ppo_cfg), jnp.zeros((g, 1))
  rng = np.random.default_rng(0)
  theta = jnp.zeros(4)
  for _ in range(steps):
    p = np.asarray(jax.nn.softmax(theta), np.float64)
    y = rng.choice(4, size=g, p=p / p.sum())
    r = (y == 2).astype(np.float32)
    if algo == "grpo":
      adv = A.grpo_advantages(r, m, group_size=g)
    elif algo == "rloo":
      adv = A.rloo_advantages(r, m, group_size=g)
    else:  # critic-free PPO: V = 0, the score on the single token, GAE with lam = 1
      adv = ppo_adv(r, z, z, z, m, jnp.zeros(g, bool), 0.0)["advantages"]
    theta = step(theta, jnp.asarray(y), adv)
  assert float(jax.nn.softmax(theta)[2]) > 0.8  # from 0.25


# ------------------------------------------------------------------ registry and configs


def test_registry_lookup_and_errors():
  assert A.get_advantage("gae") is A.gae_advantages
  assert A.get_loss("ppo_clip") is A.clipped_policy_loss
  assert {"gae", "grpo", "rloo", "remax"} <= set(A.list_advantages())
  with pytest.raises(KeyError, match=r"unknown advantage 'vtrace'; known: gae, grpo, remax, rloo"):
    A.get_advantage("vtrace")
  with pytest.raises(ValueError, match="loss 'sft' is already registered"):
    A.register_loss("sft")(lambda: None)


@pytest.mark.parametrize(
  "cls,field,value",
  [
    (A.PPOConfig, "gamma", 1.5),
    (A.PPOConfig, "lam", -0.1),
    (A.PPOConfig, "clip_eps", 0.0),
    (A.PPOConfig, "dual_clip", 1.0),
    (A.PPOConfig, "value_clip_eps", -1.0),
    (A.PPOConfig, "kl_coef", -0.1),
    (A.PPOConfig, "kl_estimator", "k9"),
    (A.PPOConfig, "kl_target", 0.0),
    (A.PPOConfig, "reward_clip", 0.0),
    (A.PPOConfig, "no_eos_penalty", -1.0),
    (A.PPOConfig, "entropy_coef", -1.0),
    (A.PPOConfig, "ppo_epochs", 0),
    (A.PPOConfig, "mini_batches", 2.0),
    (A.PPOConfig, "loss_agg", "sum"),
    (A.PPOConfig, "kl_in_reward", 1),
    (A.GRPOConfig, "group_size", 1),
    (A.GRPOConfig, "beta", -0.1),
    (A.GRPOConfig, "loss_agg", "x"),
    (A.RLOOConfig, "group_size", 1),
    (A.ReMaxConfig, "kl_coef", -1.0),
    (A.DPOConfig, "beta", 0.0),
    (A.DPOConfig, "label_smoothing", 0.5),
    (A.DPOConfig, "loss_type", "hinge"),
  ],
)
def test_config_validation_names_the_field(cls, field, value):
  with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field} must be"):
    cls(**{field: value})


def test_shape_mismatch_names_the_argument():
  with pytest.raises(ValueError, match=r"gae_advantages: values has shape \(2, 4\)"):
    A.gae_advantages(jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.ones((2, 3)), gamma=1.0, lam=0.9)

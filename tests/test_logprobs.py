"""Chunked LM-head log-probs (`chunked_logprobs`, `Transformer.token_logprobs`) against NumPy,
against the unchunked computation (values and gradients), under a sharded layout, and the memory
the chunking saves (XLA's own memory analysis of the compiled gradient)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from real_jax import _calls
from real_jax.models import create_model, get_config
from real_jax.models.transformer import activation_constraints, chunked_logprobs, logits_chunk_size
from sharding import Layout


def _np_reference(h, w, targets, temperature):
  x = np.einsum("btd,dv->btv", h.astype(np.float64), w.astype(np.float64)) / temperature
  m = x.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
  lp = np.take_along_axis(x, targets[..., None], -1)[..., 0] - lse
  p = np.exp(x - lse[..., None])
  ent = lse - (p * x).sum(-1)
  return lp, ent


@pytest.mark.parametrize("b,t,v,chunk,temperature", [
    (2, 12, 40, 5, 1.0),    # 3 chunks, the last padded by 3
    (3, 16, 33, 4, 0.7),    # 4 even chunks
    (1, 7, 50, 16, 1.3),    # chunk > t: one chunk
    (2, 9, 20, 1, 1.0),     # one position per chunk
])
def test_chunked_logprobs_match_numpy(b, t, v, chunk, temperature):
  rng = np.random.default_rng(b * 100 + t)
  h = rng.normal(size=(b, t, 8)).astype(np.float32)
  w = rng.normal(size=(8, v)).astype(np.float32)
  targets = rng.integers(0, v, size=(b, t)).astype(np.int32)
  lp, ent = jax.jit(lambda h, w, tg: chunked_logprobs(h, w, tg, temperature, chunk=chunk, entropy=True))(h, w, targets)
  want_lp, want_ent = _np_reference(h, w, targets, temperature)
  np.testing.assert_allclose(np.asarray(lp), want_lp, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(ent), want_ent, atol=2e-5, rtol=1e-5)
  assert lp.shape == ent.shape == (b, t)


def test_chunked_gradients_equal_unchunked():
  """d/dh and d/dw of a weighted sum of log-probs and entropies: chunked (recomputed in the backward
  pass) equals one chunk."""
  rng = np.random.default_rng(7)
  h = rng.normal(size=(2, 10, 6)).astype(np.float32)
  w = rng.normal(size=(6, 30)).astype(np.float32)
  targets = rng.integers(0, 30, size=(2, 10)).astype(np.int32)
  a, c = rng.normal(size=(2, 10)).astype(np.float32), rng.normal(size=(2, 10)).astype(np.float32)

  def loss(h, w, chunk):
    lp, ent = chunked_logprobs(h, w, targets, 0.8, chunk=chunk, entropy=True)
    return jnp.sum(a * lp) + jnp.sum(c * ent)

  g_full = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(h, w, 10)
  g_chunk = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(h, w, 3)
  for x, y in zip(g_chunk, g_full):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(g_full[1]).sum()) > 0


def test_chunking_bounds_gradient_memory():
  """The compiled gradient's temporaries: with 8 chunks they are well under a quarter of one chunk's
  (which holds the whole [B, T, V] float32 logits and their softmax)."""
  b, t, d, v = 2, 256, 16, 2048
  h = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
  w = jax.ShapeDtypeStruct((d, v), jnp.float32)
  tg = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def temp_bytes(chunk):
    f = jax.jit(jax.grad(lambda h, w, tg: jnp.sum(chunked_logprobs(h, w, tg, chunk=chunk)[0]), argnums=(0, 1)))
    return f.lower(h, w, tg).compile().memory_analysis().temp_size_in_bytes

  whole, chunked = temp_bytes(t), temp_bytes(t // 8)
  logits_bytes = b * t * v * 4
  assert whole >= logits_bytes, (whole, logits_bytes)
  assert chunked < whole / 4, (chunked, whole)


def test_auto_chunk_uses_per_device_rows_and_vocab():
  from real_jax.models import transformer
  assert logits_chunk_size(0, 4, 64, 1000) == 64                    # fits: one chunk
  assert logits_chunk_size(24, 4, 64, 1000) == 24                   # set explicitly
  assert logits_chunk_size(100, 4, 64, 1000) == 64                  # capped at t
  budget = transformer.AUTO_CHUNK_LOGITS
  big = logits_chunk_size(0, 32, 512, 151936)
  assert 512 % big == 0 and 32 * big * 151936 <= budget < 32 * 2 * big * 151936
  layout = Layout.on(0, data=2, fsdp=2, tensor=2)
  with activation_constraints(_calls.sharding_hook(layout)):
    sharded = logits_chunk_size(0, 32, 512, 151936)
  assert sharded == 8 * big  # 4x fewer rows and 2x less vocab per device
  odd = logits_chunk_size(0, 1, 509, budget // 100)                 # prime length: no divisor fits
  assert odd == 100


def test_bf16_weight_gradient_accumulates_in_float32():
  """bf16 h and w, 32 chunks: the weight gradient is as close to the float32 one as the single-chunk
  bf16 gradient is (a bf16 running sum over 32 chunks would be several times further off)."""
  rng = np.random.default_rng(3)
  h32 = rng.normal(size=(4, 64, 16)).astype(np.float32)
  w32 = (0.3 * rng.normal(size=(16, 64))).astype(np.float32)
  targets = rng.integers(0, 64, size=(4, 64)).astype(np.int32)
  g = rng.normal(size=(4, 64)).astype(np.float32)

  def dw(h, w, chunk):
    f = lambda w: jnp.sum(g * chunked_logprobs(h, w, targets, chunk=chunk)[0])  # noqa: E731
    return np.asarray(jax.jit(jax.grad(f))(w), np.float64)

  ref = dw(h32, w32, 64)
  hb, wb = jnp.asarray(h32, jnp.bfloat16), jnp.asarray(w32, jnp.bfloat16)
  err_one = np.abs(dw(hb, wb, 64) - ref).max()
  err_chunked = np.abs(dw(hb, wb, 2) - ref).max()
  assert err_chunked <= 1.5 * err_one + 1e-3 * np.abs(ref).max(), (err_chunked, err_one)


def test_token_logprobs_equal_log_softmax_of_logits_sharded():
  """The model method (chunked, under data x fsdp x tensor with the vocabulary split) equals the
  log-softmax of the full logits of an unsharded copy, and the entropy matches NumPy."""
  cfg = get_config("tiny").replace(logits_chunk=3)
  layout = Layout.on(0, data=2, fsdp=2, tensor=2)
  model = create_model(cfg, layout, seed=4)
  plain = create_model(cfg, seed=4)
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, cfg.vocab_size, size=(4, 10)).astype(np.int32)
  mask = np.ones((4, 10), bool)
  mask[1, :3] = False
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, tokens, mask):
    with activation_constraints(_calls.sharding_hook(layout)):
      return nnx.merge(graphdef, state).token_logprobs(tokens, mask, temperature=0.9, entropy=True)

  lp, ent = run(state, tokens, mask)
  logits = np.asarray(jax.jit(plain.__call__)(jnp.asarray(tokens), attention_mask_BT=jnp.asarray(mask)), np.float64)
  x = logits[:, :-1] / 0.9
  lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
  want = np.take_along_axis(x, tokens[:, 1:, None], -1)[..., 0] - lse
  np.testing.assert_allclose(np.asarray(lp)[:, :-1], want, atol=3e-5)
  want_ent = lse - (np.exp(x - lse[..., None]) * x).sum(-1)
  np.testing.assert_allclose(np.asarray(ent)[:, :-1], want_ent, atol=3e-5)
  assert (np.asarray(lp)[:, -1] == 0).all() and (np.asarray(ent)[:, -1] == 0).all()


def test_token_logprobs_rejects_scalar_head():
  critic = create_model(get_config("tiny"), seed=0, head="scalar")
  with pytest.raises(ValueError, match="lm-head"):
    critic.token_logprobs(jnp.zeros((1, 4), jnp.int32))


def test_logits_chunk_validated():
  with pytest.raises(ValueError, match="logits_chunk"):
    get_config("tiny").replace(logits_chunk=-1)


def test_unrolled_layers_equal_scanned():
  """ModelConfig.unroll_layers: the same log-probs and parameter gradients as the scanned loop."""
  cfg = get_config("tiny")
  rng = np.random.default_rng(5)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(2, 9)), jnp.int32)

  def grads(unroll):
    model = create_model(cfg.replace(unroll_layers=unroll), seed=3)
    graphdef, state = nnx.split(model)

    def f(state):
      return jnp.sum(nnx.merge(graphdef, state).token_logprobs(tokens, train=True))
    return jax.jit(jax.value_and_grad(f))(state)

  (a, ga), (b, gb) = grads(False), grads(True)
  np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=1e-5)


def _np_one_token_attention(q_B1NH, k_BSKH, v_BSKH, seen_BS):
  """NumPy softmax attention of one query token per row over the slots `seen_BS` marks, query head n
  using kv head n // G."""
  b, _, n, h = q_B1NH.shape
  k = k_BSKH.shape[2]
  sc = np.einsum("bkgh,bskh->bkgs", q_B1NH.reshape(b, k, n // k, h), k_BSKH) / np.sqrt(h)
  sc = np.where(seen_BS[:, None, None, :], sc, -np.inf)
  p = np.exp(sc - sc.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bkgs,bskh->bkgh", p, v_BSKH).reshape(b, 1, n, h)


@pytest.mark.parametrize("g", [1, 3])
def test_decode_attention_dot_equals_reduce_form(g):
  """The batched-matmul decode attention (timed by bench/decode_attention.py) against the library's
  multiply-reduce form, and both against NumPy softmax attention over the valid slots plus the
  token's own key/value."""
  from bench.decode_attention import decode_attention_dot
  from real_jax.models.transformer import decode_attention
  rng = np.random.default_rng(g)
  b, s, k, h = 3, 11, 2, 8
  q = rng.normal(size=(b, 1, k * g, h)).astype(np.float32)
  kc, vc = rng.normal(size=(2, b, s, k, h)).astype(np.float32)
  kn, vn = rng.normal(size=(2, b, 1, k, h)).astype(np.float32)
  mask = rng.random((b, 1, s)) < 0.6
  mask[0] = False  # a row that sees only its own token
  a = np.asarray(decode_attention(q, kc, vc, mask, kn, vn))
  d = np.asarray(decode_attention_dot(q, kc, vc, mask, kn, vn))
  keys = np.concatenate([kc, kn], 1)                       # [B, S + 1, K, H]
  vals = np.concatenate([vc, vn], 1)
  seen = np.concatenate([mask[:, 0], np.ones((b, 1), bool)], 1)
  want = _np_one_token_attention(q, keys, vals, seen)
  np.testing.assert_allclose(a, want, atol=1e-5)
  np.testing.assert_allclose(d, want, atol=1e-5)


@pytest.mark.parametrize("g", [1, 3])
def test_fused_decode_attention_stops_at_kv_len(g):
  """The GPU decode step's attention (the fused kernel given the filled length; XLA stands in for
  cuDNN on CPU) and the bench's folded form against NumPy softmax attention over the valid slots
  below kv_len; slots at and beyond kv_len hold garbage that must not leak in even where the mask
  says valid."""
  from bench.decode_attention import fold_decode_attention
  from real_jax.models.transformer import fused_decode_attention
  rng = np.random.default_rng(10 + g)
  b, s, k, h, kv_len = 3, 13, 2, 8, 9
  q = rng.normal(size=(b, 1, k * g, h)).astype(np.float32)
  kc, vc = rng.normal(size=(2, b, s, k, h)).astype(np.float32)
  kc[:, kv_len:] = 1e3  # garbage past the filled slots
  mask = rng.random((b, s)) < 0.6
  mask[:, kv_len - 1] = True  # the token's own slot
  mask[1, kv_len:] = True
  got = np.asarray(jax.jit(fused_decode_attention, static_argnums=5)(q, kc, vc, mask, jnp.int32(kv_len), "xla"))
  want = _np_one_token_attention(q, kc, vc, mask & (np.arange(s)[None, :] < kv_len))
  np.testing.assert_allclose(got, want, atol=1e-5)
  folded = np.asarray(fold_decode_attention(q, kc[:, :kv_len], vc[:, :kv_len], mask[:, :kv_len], "xla"))
  np.testing.assert_allclose(folded, want, atol=1e-5)

"""Generation: determinism, greedy = argmax of a full forward, top-k/top-p support, EOS masks,
log-prob consistency with the inference call under several layouts, n-sample grouping."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from real_jax import inference
from real_jax.generation import SamplingConfig, bucket_length, filter_logits, generate, pad_prompts, sample_token
from real_jax.models import create_model, get_config
from sharding import Layout

CFG = get_config("tiny")
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [3, 3, 3, 3, 7, 7]]
# Shared configs, so tests reuse compiled samplers.
SAMPLED = SamplingConfig(max_new_tokens=7, temperature=0.7, top_k=40, top_p=0.95, eos_id=5)
GREEDY = SamplingConfig(max_new_tokens=6, greedy=True)


@pytest.fixture(scope="module")
def model():
  return create_model(CFG, seed=1)


def _np(x):
  return np.asarray(jax.device_get(x))


def test_bucket_length():
  assert [bucket_length(n, 64) for n in (1, 3, 5, 64, 65, 130)] == [1, 4, 8, 64, 128, 192]
  toks, mask = pad_prompts(PROMPTS, bucket=8)
  assert toks.shape == (4, 8) and mask.sum(1).tolist() == [3, 5, 1, 6] and mask[:, -1].all()


def test_deterministic_for_a_key(model):
  toks, mask = pad_prompts(PROMPTS * 2, bucket=8)
  sc = SAMPLED
  a = generate(model, toks, mask, jax.random.key(7), sc)
  b = generate(model, toks, mask, jax.random.key(7), sc)
  c = generate(model, toks, mask, jax.random.key(8), sc)
  np.testing.assert_array_equal(_np(a.tokens), _np(b.tokens))
  np.testing.assert_array_equal(_np(a.logprobs), _np(b.logprobs))
  assert not np.array_equal(_np(a.tokens), _np(c.tokens))


def test_greedy_equals_argmax_of_full_forward(model):
  toks, mask = pad_prompts(PROMPTS, bucket=8)
  r = generate(model, toks, mask, jax.random.key(0), GREEDY)
  tokens, att = _np(r.tokens), _np(r.attention_mask)
  logits = _np(jax.jit(model.__call__)(jnp.asarray(tokens), attention_mask_BT=jnp.asarray(att)))
  p = toks.shape[1]
  for j in range(6):
    np.testing.assert_array_equal(tokens[:, p + j], logits[:, p + j - 1].argmax(-1))


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.5), (10, 0.3), (1, 1.0)])
def test_top_k_top_p_only_sample_allowed(top_k, top_p):
  rng = np.random.default_rng(top_k + int(top_p * 10))
  logits = jnp.asarray(rng.normal(size=(64, 50)) * 3, jnp.float32)
  sc = SamplingConfig(max_new_tokens=1, top_k=top_k, top_p=top_p)
  # Reference allowed set in NumPy: top-k by value, then smallest prefix reaching top_p.
  x = np.asarray(logits)
  allowed = np.zeros_like(x, bool)
  for i, row in enumerate(x):
    order = np.argsort(-row)
    keep = order[:top_k] if top_k else order
    probs = np.exp(row[keep] - row[keep].max())
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    allowed[i, keep[before < top_p]] = True
  np.testing.assert_array_equal(_np(filter_logits(logits, top_k, top_p)) > -np.inf, allowed)
  for seed in range(20):
    tok, lp = sample_token(jax.random.key(seed), logits, sc)
    tok = _np(tok)
    assert allowed[np.arange(64), tok].all()
    ref = _np(jax.nn.log_softmax(logits, -1))[np.arange(64), tok]  # unmasked distribution
    np.testing.assert_allclose(_np(lp), ref, atol=1e-6)


def test_eos_stops_and_masks(model):
  toks, mask = pad_prompts(PROMPTS, bucket=8)
  # Greedy: pick EOS as the token some row emits at its 2nd step, so that row stops there.
  free = generate(model, toks, mask, jax.random.key(0), GREEDY)
  p = toks.shape[1]
  ft = _np(free.tokens)
  eos = int(ft[0, p + 1])
  r = generate(model, toks, mask, jax.random.key(0), SamplingConfig(max_new_tokens=6, greedy=True, eos_id=eos,
                                                                   pad_id=0))
  t, pm, rm, lp = _np(r.tokens), _np(r.prompt_mask), _np(r.response_mask), _np(r.logprobs)
  ended, n = _np(r.ended_with_eos), _np(r.response_len)
  np.testing.assert_array_equal(pm[:, :p], mask)
  assert not pm[:, p:].any() and not rm[:, :p].any()
  for i in range(4):
    resp = ft[i, p:]
    hits = np.nonzero(resp == eos)[0]
    want = hits[0] + 1 if len(hits) else 6
    assert n[i] == want and ended[i] == bool(len(hits))
    np.testing.assert_array_equal(rm[i, p:], np.arange(6) < want)
    np.testing.assert_array_equal(t[i, p:p + want], resp[:want])   # same tokens as without EOS
    assert (t[i, p + want:] == 0).all()                             # pad after EOS
    np.testing.assert_array_equal(lp[i] != 0, r.logprob_mask[i])    # log-probs only on response targets
  assert ended[0] and n[0] == 2


LAYOUTS = [Layout.on(0), Layout.on(0, fsdp=4, tensor=2)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_generation_logprobs_equal_inference_fp32(model, layout):
  m = model if layout.strategy.size == 1 else create_model(CFG, layout, seed=1)
  toks, mask = pad_prompts(PROMPTS * 2, bucket=8)
  r = generate(m, toks, mask, jax.random.key(3), SAMPLED, layout)
  lp = inference.logprobs(m, r.tokens, r.attention_mask, layout, temperature=0.7, micro_batches=2)
  sel = _np(r.logprob_mask)
  assert sel.sum() > 20
  diff = np.abs(_np(lp) - _np(r.logprobs))[sel]
  assert diff.max() < 1e-5, diff.max()
  assert np.all(_np(r.logprobs)[~sel] == 0)


def test_generation_logprobs_bf16_gap():
  """bf16 compute: the same forward path, so the gap is rounding only (measured, documented)."""
  cfg = CFG.replace(dtype="bfloat16", param_dtype="float32")
  layout = Layout.on(0, data=2, tensor=2)
  m = create_model(cfg, layout, seed=1)
  toks, mask = pad_prompts(PROMPTS, bucket=8)
  r = generate(m, toks, mask, jax.random.key(3), SamplingConfig(max_new_tokens=7, scan_layers=True), layout)
  lp = inference.logprobs(m, r.tokens, r.attention_mask, layout)
  sel = _np(r.logprob_mask)
  diff = np.abs(_np(lp) - _np(r.logprobs))[sel]
  print(f"bf16 generation vs inference |dlogp|: max {diff.max():.3g} mean {diff.mean():.3g}")
  assert diff.max() < 0.1


def test_n_samples_group_major(model):
  toks, mask = pad_prompts(PROMPTS[:2], bucket=8)
  r = generate(model, toks, mask, jax.random.key(1), SamplingConfig(max_new_tokens=5, n=3))
  t = _np(r.tokens)
  assert t.shape == (6, 13)
  for i in range(2):
    for j in range(3):
      np.testing.assert_array_equal(t[3 * i + j, :8], toks[i])
  assert len({tuple(t[k, 8:]) for k in range(3)}) > 1  # distinct samples within a group


def test_segment_ends():
  from real_jax.generation import segment_ends
  assert segment_ends(255, 4) == [64, 128, 192, 255]
  assert segment_ends(5, 4) == [2, 3, 4, 5]
  assert segment_ends(2, 4) == [1, 2]
  assert segment_ends(0, 4) == []
  assert segment_ends(7, 1) == [7]


@pytest.mark.parametrize("segments", [1, 3])
def test_layered_decode_equals_stacked(model, segments):
  """The layered loop (per-layer weights and caches, segmented prefix reads) against the stacked one."""
  toks, mask = pad_prompts(PROMPTS * 2, bucket=8)
  cfg = SamplingConfig(max_new_tokens=7, top_p=0.9, eos_id=tuple(range(3, 256, 7)), n=2, decode_segments=segments)
  a = generate(model, toks, mask, jax.random.key(5), cfg)
  b = generate(model, toks, mask, jax.random.key(5), dataclasses.replace(cfg, decode="stacked"))
  np.testing.assert_array_equal(_np(a.tokens), _np(b.tokens))
  np.testing.assert_array_equal(_np(a.response_mask), _np(b.response_mask))
  np.testing.assert_array_equal(_np(a.ended_with_eos), _np(b.ended_with_eos))
  np.testing.assert_allclose(_np(a.logprobs), _np(b.logprobs), atol=1e-6)
  assert _np(a.ended_with_eos).any() and not _np(a.ended_with_eos).all()


def test_full_cache_decode_path_equals_prefix_path(model, monkeypatch):
  """The GPU decode step (write the slot, then fused attention over the whole cache; forced here,
  with the XLA attention standing in for cuDNN on CPU) against the CPU one (read a static prefix,
  own key/value joined in `decode_attention`): same tokens, log-probs to rounding."""
  from real_jax import _calls
  from real_jax.models import transformer
  toks, mask = pad_prompts(PROMPTS * 2, bucket=8)
  cfg = SamplingConfig(max_new_tokens=7, top_p=0.9, eos_id=tuple(range(3, 256, 7)), n=2, decode_segments=3)
  assert not transformer.decode_on_full_cache(model.cfg, jnp.bfloat16)  # CPU: the prefix path
  a = generate(model, toks, mask, jax.random.key(6), cfg)
  monkeypatch.setattr(_calls, "_CACHE", {})  # A fresh sampler, traced with the other decode step.
  monkeypatch.setattr(transformer, "decode_on_full_cache", lambda cfg, dtype: True)
  b = generate(model, toks, mask, jax.random.key(6), cfg)
  np.testing.assert_array_equal(_np(a.tokens), _np(b.tokens))
  np.testing.assert_array_equal(_np(a.response_mask), _np(b.response_mask))
  np.testing.assert_allclose(_np(a.logprobs), _np(b.logprobs), atol=1e-5)
  assert _np(a.ended_with_eos).any()


def test_per_layer_cache_decode_equals_full_forward(model):
  """Prefill then single-token steps with a per-layer cache and a static read prefix (kv_len)."""
  from real_jax.models import KVCache
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, CFG.vocab_size, size=(3, 9)), jnp.int32)
  mask = jnp.asarray(np.arange(9)[None, :] >= np.array([[0], [2], [4]]))  # left padding
  full = _np(jax.jit(model.__call__)(tokens, attention_mask_BT=mask))
  cache = KVCache.zeros(CFG, 3, 12, per_layer=True)
  step = jax.jit(lambda t, m, c, n: model.forward(t, attention_mask_BT=m, cache=c, kv_len=n), static_argnums=3)
  logits, cache = step(tokens[:, :5], mask[:, :5], cache, None)
  pieces = [_np(logits)]
  for i in range(5, 9):
    logits, cache = step(tokens[:, i:i + 1], mask[:, i:i + 1], cache, i + 1)  # reads slots < i + 1 only
    pieces.append(_np(logits))
  got = np.concatenate(pieces, axis=1)
  real = _np(mask)
  np.testing.assert_allclose(got[real], full[real], rtol=1e-5, atol=1e-5)
  assert int(cache.index) == 9 and not bool(cache.valid[:, 9:].any())


def _loop_moves(model, cfg):
  """Data-movement ops (copies, slice-only fusions) in the compiled decode loops, by element count."""
  from bench.generate import hlo_loop_moves
  from real_jax.generation import sampler

  graphdef, state = nnx.split(model)
  toks, mask = pad_prompts(PROMPTS[:3], bucket=8)
  txt = sampler(graphdef, state, toks.shape, cfg, Layout.on(0)).lower(
      state, jnp.asarray(toks), jnp.asarray(mask), jax.random.key(0)).compile().as_text()
  moves = hlo_loop_moves(txt, min_bytes=0)
  return moves["loops"], moves["elements"]


def test_decode_loop_slices_no_weights_and_copies_no_cache(model):
  """The layered decode loop reads per-layer weights and updates each cache buffer in place: no
  weight-sized slice and no cache-sized copy inside a decode loop body (the stacked loop has both
  on this backend, which shows the check can fail)."""
  p = model.layers.arrays()
  weight_sizes = {int(np.prod(a.shape[1:])) for a in p.values() if a.ndim >= 3}
  m = 6
  cfg = SamplingConfig(max_new_tokens=m, greedy=True, decode_segments=2)
  cache_size = 3 * (8 + m - 1) * CFG.n_kv_heads * CFG.head_dim
  assert cache_size not in weight_sizes
  loops, sizes = _loop_moves(model, cfg)
  assert loops == 2
  assert not weight_sizes & set(sizes) and cache_size not in sizes, sizes
  _, stacked = _loop_moves(model, dataclasses.replace(cfg, decode="stacked"))
  assert weight_sizes & set(stacked), stacked


@pytest.mark.parametrize("v", [60, 256])
def test_two_level_categorical_matches_softmax(v):
  """bench/sampling.py's two-level draw (chunk by mass, then token inside) samples softmax(logits) exactly:
  empirical frequencies of 20k draws within 5 standard errors of the probabilities (NumPy), for
  peaked and flat rows, with one chunk holding only -inf logits (never drawn)."""
  from bench.sampling import two_level_categorical, vocab_chunk
  c = vocab_chunk(v)
  assert c and v % c == 0 and 1 < c < v
  rng = np.random.default_rng(v)
  logits = rng.normal(size=(2, v)) * np.array([[3.0], [0.3]])
  logits[:, :c] = -np.inf
  n = 20000
  x = jnp.asarray(np.repeat(logits, n, axis=0), jnp.float32)
  tok = np.asarray(jax.jit(two_level_categorical, static_argnums=2)(jax.random.key(v), x, c)).reshape(2, n)
  for row in range(2):
    p = np.exp(logits[row] - logits[row].max())
    p /= p.sum()
    freq = np.bincount(tok[row], minlength=v) / n
    assert not freq[:c].any()
    np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / n) + 1e-4)


def test_sample_token_greedy_and_logprob():
  """Greedy picks NumPy's first maximum (ties included), and every draw's log-prob (scaled logit
  minus the row's logsumexp) equals log_softmax(logits / T) at the token (NumPy)."""
  rng = np.random.default_rng(7)
  x = rng.normal(size=(6, 256)).astype(np.float32)
  x[1, [40, 200]] = 9.0   # tied maxima far apart
  x[2, [33, 34]] = 9.0    # tied neighbours
  x[3, :] = 0.0           # all tied
  for cfg in (SamplingConfig(max_new_tokens=1, greedy=True, temperature=0.7),
              SamplingConfig(max_new_tokens=1, temperature=0.7)):
    tok, lp = sample_token(jax.random.key(3), jnp.asarray(x), cfg)
    tok = _np(tok)
    if cfg.greedy:
      np.testing.assert_array_equal(tok, x.argmax(-1))
    z = x / 0.7
    ref = z - z.max(-1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    np.testing.assert_allclose(_np(lp), ref[np.arange(6), tok], atol=1e-5)

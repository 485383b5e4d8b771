"""Inference calls: log-probs and values against a plain forward, micro-batching, layouts, caching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from real_jax import _calls, inference
from real_jax.models import create_model, get_config
from sharding import Layout

CFG = get_config("tiny")


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, CFG.vocab_size, size=(8, 12)).astype(np.int32)
  mask = np.ones((8, 12), bool)
  for i, pad in enumerate([0, 3, 1, 5, 0, 2, 4, 0]):  # left padding
    mask[i, :pad] = False
  return tokens, mask


@pytest.fixture(scope="module")
def lm():
  return create_model(CFG, seed=2)


def test_logprobs_alignment_and_micro_batches(lm):
  tokens, mask = _batch()
  lp1 = np.asarray(inference.logprobs(lm, tokens, mask, temperature=0.5))
  lp4 = np.asarray(inference.logprobs(lm, tokens, mask, temperature=0.5, micro_batches=4))
  logits = np.asarray(jax.jit(lm.__call__)(jnp.asarray(tokens), attention_mask_BT=jnp.asarray(mask)), np.float64)
  x = logits / 0.5
  ref = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
  want = np.take_along_axis(ref[:, :-1], tokens[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(lp1[:, :-1], want, atol=2e-5)
  assert (lp1[:, -1] == 0).all()
  np.testing.assert_allclose(lp4, lp1, atol=1e-6)


def test_logprobs_same_under_sharded_layout(lm):
  tokens, mask = _batch()
  layout = Layout.on(0, data=2, fsdp=2, tensor=2)
  sharded = create_model(CFG, layout, seed=2)
  a = np.asarray(inference.logprobs(lm, tokens, mask))
  b = inference.logprobs(sharded, tokens, mask, layout, micro_batches=2)
  assert b.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(np.asarray(b), a, atol=1e-5)


def test_values_and_scores():
  tokens, mask = _batch()
  layout = Layout.on(0, fsdp=4)
  critic = create_model(CFG, layout, seed=3, head="scalar")
  v, s = inference.values(critic, tokens, mask, layout, micro_batches=2)
  ref = np.asarray(jax.jit(critic.__call__)(jnp.asarray(tokens), attention_mask_BT=jnp.asarray(mask)))
  np.testing.assert_allclose(np.asarray(v), ref, atol=1e-5)
  np.testing.assert_allclose(np.asarray(s), ref[:, -1], atol=1e-5)  # left-padded: last column is last token
  right = np.roll(mask, 0) & False
  right[:, :7] = True  # right padding: score at column 6
  _, s2 = inference.values(critic, tokens, right, layout, micro_batches=2)
  ref2 = np.asarray(jax.jit(critic.__call__)(jnp.asarray(tokens), attention_mask_BT=jnp.asarray(right)))
  np.testing.assert_allclose(np.asarray(s2), ref2[:, 6], atol=1e-5)


def test_calls_are_cached(lm):
  tokens, mask = _batch()
  inference.logprobs(lm, tokens, mask)
  n = _calls.cache_size()
  inference.logprobs(lm, tokens + 1, mask)
  assert _calls.cache_size() == n

"""Model tests: published parameter counts, layout invariance, causality, padding and the KV cache."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from real_jax.models import KVCache, ModelConfig, RopeScaling, create_model, get_config, param_count
from sharding import Layout

# Counts of the real checkpoints' safetensors (model cards / HF hub metadata).
PUBLISHED = {
    "7b": 6_738_415_616,  # Llama-2-7b
    "13b": 13_015_864_320,  # Llama-2-13b
    "34b": 33_743_970_304,  # CodeLlama-34b
    "70b": 68_976_648_192,  # Llama-2-70b
    "1b": 1_235_814_400,  # Llama-3.2-1B
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-7b": 7_615_616_512,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_count_matches_published(name):
  assert param_count(get_config(name)) == PUBLISHED[name]


def test_param_count_matches_allocated_state():
  for cfg in [get_config("tiny"), get_config("tiny", qkv_bias=True, tie_embeddings=True)]:
    for head in ("lm", "scalar"):
      from real_jax.models import abstract_model
      state = nnx.state(abstract_model(cfg, head=head), nnx.Param)
      n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
      assert n == param_count(cfg, head), (cfg, head)


CFG = get_config("tiny", qkv_bias=True)


@pytest.fixture(scope="module")
def tokens():
  return np.asarray(jax.random.randint(jax.random.key(3), (8, 12), 0, CFG.vocab_size), np.int32)


@pytest.fixture(scope="module")
def reference_logits(tokens):
  model = create_model(CFG, seed=7)
  _randomise_biases(model)
  return np.asarray(model(jnp.asarray(tokens)))


def _randomise_biases(model):
  """Zero-initialised biases would hide bias bugs; give them values (deterministically)."""
  for i, name in enumerate(("bq", "bk", "bv")):
    p = getattr(model.layers, name)
    v = p.get_value()
    p.set_value(jax.device_put(0.1 * jax.random.normal(jax.random.key(100 + i), v.shape, v.dtype), v.sharding))


@pytest.mark.parametrize("layout", [
    Layout.on(0),
    Layout.on(0, data=8, rules="replicated"),
    Layout.on(0, fsdp=8),
    Layout.on(0, fsdp=4, tensor=2),
    Layout.on(0, data=2, tensor=4),  # 2 kv heads over tensor=4: kv projections replicated (documented).
    Layout.on(4, fsdp=2, tensor=2),
], ids=str)
def test_logits_equal_across_layouts(layout, tokens, reference_logits):
  model = create_model(CFG, layout, seed=7)
  _randomise_biases(model)
  spec = model.layers.wq.get_value().sharding.spec
  assert model.layers.wq.get_value().sharding.mesh.devices.size == layout.device_mesh.size
  if layout.strategy.tensor > 1:
    assert "tensor" in jax.tree.leaves(tuple(spec)), spec
  batch = jax.device_put(tokens, layout.named(("data", "fsdp")))
  out = nnx.jit(lambda m, t: m(t))(model, batch)
  np.testing.assert_allclose(np.asarray(out), reference_logits, rtol=1e-5, atol=1e-5)


def test_strategy_that_does_not_divide_heads_fails_clearly():
  with pytest.raises(ValueError, match=r"'heads' of size 4 does not divide over mesh axes tensor of size 8"):
    create_model(CFG, Layout.on(0, tensor=8))


@settings(max_examples=8, deadline=None)
@given(t=st.integers(0, 11), new=st.integers(0, CFG.vocab_size - 2))  # Shift 1 .. V-1: never back to itself.
def test_causality(t, new, tokens):
  model = _shared_model()
  base = np.asarray(_jit_call(model, jnp.asarray(tokens)))
  changed = tokens.copy()
  changed[:, t] = (tokens[:, t] + 1 + new) % CFG.vocab_size  # Really changed in every row.
  out = np.asarray(_jit_call(model, jnp.asarray(changed)))
  np.testing.assert_array_equal(out[:, :t], base[:, :t])  # Same program: bitwise equal before t.
  assert (np.abs(out[:, t] - base[:, t]).max(axis=-1) > 0).all()  # ...and token t itself is seen.


_MODEL = {}


def _shared_model():
  if "m" not in _MODEL:
    _MODEL["m"] = create_model(CFG, seed=7)
    _randomise_biases(_MODEL["m"])
  return _MODEL["m"]


@nnx.jit
def _jit_call(model, tokens, positions=None, mask=None):
  return model(tokens, positions, mask)


def test_left_padding_does_not_change_real_positions(tokens, reference_logits):
  model = _shared_model()
  pad = 3
  padded = np.concatenate([np.zeros((8, pad), np.int32), tokens], axis=1)
  mask = np.concatenate([np.zeros((8, pad), bool), np.ones(tokens.shape, bool)], axis=1)
  out = np.asarray(_jit_call(model, jnp.asarray(padded), None, jnp.asarray(mask)))
  np.testing.assert_allclose(out[:, pad:], reference_logits, rtol=1e-5, atol=1e-5)
  assert np.isfinite(out).all()


def test_kv_cache_prefill_then_decode_equals_full_forward(tokens, reference_logits):
  model = _shared_model()
  cache = KVCache.zeros(CFG, 8, 16)
  pieces = []
  for lo, hi in [(0, 5), (5, 6), (6, 7), (7, 12)]:
    logits, cache = model.forward(jnp.asarray(tokens[:, lo:hi]), cache=cache)
    pieces.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), reference_logits, rtol=1e-5, atol=1e-5)
  assert int(cache.index) == 12 and bool(cache.valid[:, :12].all()) and not bool(cache.valid[:, 12:].any())


def test_rope_scaling_changes_long_range_logits(tokens):
  base = get_config("tiny", rope_theta=500000.0)
  scaled = dataclasses.replace(base, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8))
  a = np.asarray(create_model(base, seed=1)(jnp.asarray(tokens)))
  b = np.asarray(create_model(scaled, seed=1)(jnp.asarray(tokens)))
  np.testing.assert_allclose(a[:, 0], b[:, 0], rtol=1e-5, atol=1e-6)  # Position 0: no rotation at all.
  assert np.abs(a[:, 1:] - b[:, 1:]).max() > 1e-4


def test_scalar_head_shapes_and_sharding():
  model = create_model(CFG, Layout.on(0, fsdp=4, tensor=2), head="scalar", seed=2)
  values = nnx.jit(lambda m, t: m(t))(model, jnp.zeros((4, 6), jnp.int32))
  assert values.shape == (4, 6) and values.dtype == jnp.float32
  assert not hasattr(model, "lm_head")


def test_bf16_compute_with_fp32_params_is_close():
  cfg32 = get_config("tiny")
  cfg16 = cfg32.replace(dtype="bfloat16")
  toks = jnp.arange(24, dtype=jnp.int32).reshape(2, 12)
  a = np.asarray(create_model(cfg32, seed=5)(toks))
  b_model = create_model(cfg16, seed=5)
  assert b_model.embed.get_value().dtype == jnp.float32
  b = np.asarray(b_model(toks))
  assert b.dtype == np.float32
  assert np.linalg.norm(a - b) / np.linalg.norm(a) < 2e-2


@pytest.mark.parametrize("bad, match", [
    (dict(n_heads=6, n_kv_heads=4), "multiple of n_kv_heads"),
    (dict(head_dim=15), "even"),
    (dict(family="gpt2"), "family"),
    (dict(d_model=0), "d_model"),
    (dict(dtype="float16"), "dtype"),
])
def test_config_validation(bad, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig(**bad)


def test_unknown_preset():
  with pytest.raises(ValueError, match="unknown model preset 'llama-9b'"):
    get_config("llama-9b")


def _eqns(jaxpr) -> list:
  """Every equation of a jaxpr, nested ones (remat, pjit, custom_vjp bodies) included."""
  out = []
  for e in jaxpr.eqns:
    out.append(e)
    for p in e.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          out += _eqns(inner)
  return out


def _checkpoint_eqns(jaxpr):
  """Every rematerialisation equation of a jaxpr, sub-jaxprs (scan bodies) included."""
  return [e for e in _eqns(jaxpr) if "prevent_cse" in e.params]


@pytest.mark.parametrize("unroll", [True, False])
@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_cse_barriers_when_the_layers_are_unrolled(unroll, remat):
  """Unrolled layers must keep prevent_cse: without it XLA merged the recomputation with the forward on
  GPU and "full" remat saved nothing (87.6 vs 40.8 GiB for a 7B step on 4x H200). Under scan it is off."""
  cfg = get_config("tiny", remat=remat, unroll_layers=unroll)
  graphdef, state = nnx.split(create_model(cfg, seed=0))
  tokens = jnp.ones((2, 8), jnp.int32)

  def loss(state):
    return nnx.merge(graphdef, state)(tokens, train=True).astype(jnp.float32).sum()

  eqns = _checkpoint_eqns(jax.make_jaxpr(jax.grad(loss))(state).jaxpr)
  assert len(eqns) >= (cfg.n_layers if unroll else 1), [e.primitive.name for e in eqns]
  assert all(e.params["prevent_cse"] is unroll for e in eqns), [e.params["prevent_cse"] for e in eqns]


def test_unrolled_layer_gradient_is_one_concatenate_per_parameter():
  """The unrolled loop's stacked-parameter gradient is one concatenate per parameter, never a pad per layer
  summed into the stack: XLA fused that sum into the optimizer's reductions on GPU, and a 7B train step
  took 2.8x as long (0.680 vs 0.241 s at tensor=2 on 2x H200)."""
  cfg = get_config("tiny", remat="full", unroll_layers=True)
  graphdef, state = nnx.split(create_model(cfg, seed=0))
  tokens = jnp.ones((2, 8), jnp.int32)

  def loss(state):
    return nnx.merge(graphdef, state)(tokens, train=True).astype(jnp.float32).sum()

  stacked = nnx.merge(graphdef, state).layers.arrays()
  shapes = {tuple(a.shape) for a in stacked.values()}
  eqns = _eqns(jax.make_jaxpr(jax.grad(loss))(state).jaxpr)
  # Equations that build a whole [n_layers, ...] stack from per-layer pieces, or take pieces from one.
  into_stack = [e.primitive.name for e in eqns if e.primitive.name in ("pad", "concatenate")
                and tuple(e.outvars[0].aval.shape) in shapes]
  from_stack = [e.primitive.name for e in eqns if e.primitive.name in ("slice", "split")
                and tuple(e.invars[0].aval.shape) in shapes]
  assert into_stack.count("pad") == 0, into_stack
  assert into_stack.count("concatenate") == len(stacked), into_stack
  assert from_stack == ["split"] * len(stacked), from_stack


def test_layer_arrays_matches_static_slices_and_checks_the_layer_count():
  from real_jax.models.transformer import layer_arrays
  rng = np.random.default_rng(0)
  stacked = {"w": jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32),
             "b": jnp.asarray(rng.normal(size=(3, 7)), jnp.float32)}
  layers = layer_arrays(stacked, 3)
  for i, lp in enumerate(layers):
    assert set(lp) == {"w", "b"}
    for k in lp:
      np.testing.assert_array_equal(np.asarray(lp[k]), np.asarray(stacked[k][i]))
  weights = jnp.asarray(rng.normal(size=3), jnp.float32)
  grad = jax.grad(lambda s: sum(weights[i] * jnp.sum(lp["w"] ** 2) for i, lp in enumerate(layer_arrays(s, 3))))
  want = 2 * np.asarray(weights)[:, None, None] * np.asarray(stacked["w"])
  np.testing.assert_allclose(np.asarray(grad(stacked)["w"]), want, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(grad(stacked)["b"]), 0)
  with pytest.raises(ValueError, match="stacks 3 layers, expected 4"):
    layer_arrays(stacked, 4)

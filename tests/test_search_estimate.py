"""search.estimator: how the compiled tier combines a call's lowered parts, and what the analytic tier
charges for the kernels that run (decode cache reads, unfused attention, heads)."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from search import CallSpec, ModelShape
from search.estimator import _counts, analytic_counts, compiled_cost, head_counts
from sharding import Layout

SHAPE = ModelShape(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, d_ff=512, vocab_size=1000,
                   params=4_000_000)
ONE = Layout.on(0)


def _matmul(n):
  x = jax.ShapeDtypeStruct((n, n), jnp.float32)
  return jax.jit(lambda a: a @ a).lower(x)


def test_compiled_generation_is_main_plus_extra_decode_steps():
  main, dec = _matmul(64), _matmul(32)
  f_main, f_dec = _counts(main, ONE, 8)["flops"], _counts(dec, ONE, 8)["flops"]
  spec = CallSpec("g", "m", "generate", 8, SHAPE, prompt_len=16, new_tokens=9,
                  lower=lambda lay: {"main": main, "decode": dec, "decode_extra": 5, "layer_loop": "unrolled"})
  cost = compiled_cost(spec, ONE, 8)
  assert cost.flops == pytest.approx(f_main + 5 * f_dec) and cost.steps == 9
  # Without decode_extra: new_tokens - 1 steps beyond main; a scanned layer loop adds the other layers.
  spec = dataclasses.replace(spec, lower=lambda lay: {"main": main, "decode": dec})
  scanned = compiled_cost(spec, ONE, 8)
  a = analytic_counts(dataclasses.replace(spec, new_tokens=1), ONE)
  a1 = analytic_counts(dataclasses.replace(spec, new_tokens=1, shape=dataclasses.replace(SHAPE, n_layers=1)), ONE)
  assert scanned.flops == pytest.approx(f_main + 8 * f_dec + a.flops - a1.flops)


def test_compiled_chunked_head_adds_the_other_chunks():
  main = _matmul(64)
  f_main = _counts(main, ONE, 8)["flops"]
  spec = CallSpec("i", "m", "inference", 8, dataclasses.replace(SHAPE, n_layers=1), seq_len=32,
                  lower=lambda lay: {"main": main, "logits_chunks": 4})
  head_flops, _ = head_counts(spec, ONE)
  assert head_flops == 8 * 32 * 2 * 256 * 1000
  assert compiled_cost(spec, ONE, 8).flops == pytest.approx(f_main + 0.75 * head_flops)
  scalar = dataclasses.replace(spec, head="scalar")
  assert head_counts(scalar, ONE) == (0.0, 0.0) and compiled_cost(scalar, ONE, 8).flops == pytest.approx(f_main)


def test_analytic_decode_reads_the_slots_the_loop_reads():
  t2 = Layout.on(0, data=2, tensor=2)
  spec = CallSpec("g", "m", "generate", 8, SHAPE, prompt_len=128, new_tokens=512)
  default = analytic_counts(spec, t2)
  full = analytic_counts(dataclasses.replace(spec, decode_kv_slots=128 + 512 - 1), t2)
  # Per step and row (4 rows per data group): the extra slots' keys and values of every layer, kv heads split
  # over tensor.
  extra_slots = 639 - (128 + 256)
  kv_bytes = 512 * 4 * extra_slots * SHAPE.n_layers * 2 * SHAPE.n_kv_heads * SHAPE.head_dim * 2 / 2
  assert full.hbm_bytes - default.hbm_bytes == pytest.approx(kv_bytes)
  assert full.flops - default.flops == pytest.approx(512 * 8 * 4 * SHAPE.n_layers * SHAPE.n_heads * SHAPE.head_dim
                                                     * extra_slots / 4)
  with pytest.raises(ValueError, match="decode_kv_slots must be >= 0"):
    dataclasses.replace(spec, decode_kv_slots=-1.0)


def test_analytic_attention_and_heads():
  spec = CallSpec("i", "m", "inference", 8, SHAPE, seq_len=256)
  fused, unfused = analytic_counts(spec, ONE), analytic_counts(dataclasses.replace(spec, fused_attention=False), ONE)
  # Unfused attention writes the float32 scores and reads them back: ~3 x rows x N x T x S x 4 bytes per layer.
  assert unfused.hbm_bytes - fused.hbm_bytes == pytest.approx(3 * 8 * SHAPE.n_heads * 256 * 256 * 4 * SHAPE.n_layers)
  assert unfused.flops == fused.flops
  # The scalar head is [D], not [D, V].
  scalar = analytic_counts(dataclasses.replace(spec, head="scalar"), ONE)
  assert fused.flops - scalar.flops == pytest.approx(8 * 256 * 2 * SHAPE.d_model * (SHAPE.vocab_size - 1))
  # Attention: QK^T and PV over every (query, key) pair (the explicit mask skips nothing).
  no_attn = analytic_counts(dataclasses.replace(spec, seq_len=256), ONE).flops
  per_token_dense = SHAPE.dense_flops_per_token("lm")
  assert no_attn == pytest.approx(8 * 256 * (per_token_dense + 4 * SHAPE.n_layers * SHAPE.n_heads * SHAPE.head_dim
                                             * 256))


def test_memory_factor_under_tensor_parallelism():
  """A train step's analytic temp takes the kind's `memory` factor, or `memory_tensor` where tensor > 1
  and the profile has one; other kinds and profiles without it are unchanged."""
  from search.estimator import Estimator
  from search.profile import Profile
  shipped = Profile.load("h100_sxm")  # Carries h200_4gpu's two train-step factors (measured on 4x H200).
  base = shipped.replace(calibration={k: {n: v for n, v in c.items() if n != "memory_tensor"}
                                      for k, c in shipped.calibration.items()})
  cal = {k: dict(v) for k, v in base.calibration.items()}
  cal.setdefault("train_step", {}).update(memory=0.9, memory_tensor=1.5)
  prof = base.replace(calibration=cal)
  train = CallSpec("t", "m", "train_step", 8, SHAPE, seq_len=64, trained=True)
  infer = CallSpec("i", "m", "inference", 8, SHAPE, seq_len=64)
  fsdp, tensor = Layout.on(0, fsdp=2), Layout.on(0, fsdp=2, tensor=2)
  est, plain = Estimator(prof, mode="analytic", cache_dir=""), Estimator(base, mode="analytic", cache_dir="")
  cases = [(train, fsdp, 0.9), (train, tensor, 1.5), (infer, tensor, base.factor("inference", "memory"))]
  for spec, lay, want in cases:
    raw = analytic_counts(spec, lay).temp_bytes
    assert est.memory_factor(spec, lay) == want
    assert est.analytic(spec, lay).temp_bytes == pytest.approx(raw * want, rel=1e-12), (spec.kind, lay)
  assert plain.memory_factor(train, tensor) == base.factor("train_step", "memory")
  assert Estimator(shipped, mode="analytic", cache_dir="").memory_factor(train, tensor) == \
      shipped.factor("train_step", "memory_tensor") > shipped.factor("train_step", "memory")

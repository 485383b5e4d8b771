"""real_jax.plan_inputs: the compiled estimator tier lowers what runs (the layered decode loop's step,
the chunked log-probs), checked against a hand count and against the sampler itself."""

import dataclasses

import pytest

from real_jax import plan_inputs as pi
from real_jax.generation import SamplingConfig
from real_jax.models import ModelConfig
from search.estimator import _counts
from sharding import Layout

# fp32 on CPU: the decode step attends over a static cache prefix (`decode_attention`).
CFG = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
                  dtype="float32", param_dtype="float32")


def test_decode_step_matches_a_hand_count():
  b, p = 8, 32
  sc = SamplingConfig(max_new_tokens=33, bucket=32)
  lay = Layout.on(0)
  c = {kv: _counts(pi.lower_decode_step(CFG, sc, b, p, kv, lay), lay, 8) for kv in (16, 48)}
  d, n, k, h, f, v, L = (CFG.d_model, CFG.n_heads, CFG.n_kv_heads, CFG.head_dim, CFG.d_ff, CFG.vocab_size,
                         CFG.n_layers)
  # Every layer's projections and the LM head once per row; QK^T and PV over kv cached slots + the token.
  matmul = 2 * b * (L * (2 * d * n * h + 2 * d * k * h + 3 * d * f) + d * v)
  for kv, cnt in c.items():
    assert 1.0 <= cnt["flops"] / (matmul + 4 * b * L * n * h * (kv + 1)) <= 1.2, (kv, cnt["flops"])
  # One more cache slot read: its QK and PV products (plus its softmax), and its keys and values.
  per_slot = {q: (c[48][q] - c[16][q]) / 32 for q in ("flops", "bytes")}
  assert per_slot["flops"] == pytest.approx(4 * b * L * n * h, rel=0.15)
  kv_bytes = b * L * 2 * k * h * 4
  weights = 4 * (L * (d * n * h + 2 * d * k * h + n * h * d + 3 * d * f) + d * v)
  assert per_slot["bytes"] >= kv_bytes  # CPU bytes overstate GPU traffic (weaker fusion): a lower bound.
  assert c[16]["bytes"] >= weights + 16 * kv_bytes
  assert c[16]["intra"] == 0 and c[16]["n_intra"] == 0


def test_decode_step_is_one_iteration_of_the_sampler_loop():
  """The sampler with one more new token runs one more decode iteration (at cache prefix P + 1): its
  counts grow by what the separately lowered step counts, collectives included (FSDP gathers every
  layer's weights in every step)."""
  b, p = 8, 16
  lay = Layout.on(0, fsdp=2)
  main = {m: _counts(pi.lower_sampler(CFG, SamplingConfig(max_new_tokens=m, bucket=16), b, p, lay), lay, 8)
          for m in (2, 3)}
  step = _counts(pi.lower_decode_step(CFG, SamplingConfig(max_new_tokens=3, bucket=16), b, p, p + 1, lay), lay, 8)
  delta = {q: main[3][q] - main[2][q] for q in step}
  assert step["flops"] == pytest.approx(delta["flops"], rel=0.05)
  assert step["bytes"] == pytest.approx(delta["bytes"], rel=0.1)
  assert step["intra"] == pytest.approx(delta["intra"], rel=1e-6) and step["intra"] > 0
  assert step["n_intra"] == delta["n_intra"] > 0


def test_generation_parts_and_schedule():
  sc = SamplingConfig(max_new_tokens=9, bucket=16)
  segs, slots = pi.decode_schedule(sc, 16)
  assert segs == [(2, 17), (2, 19), (2, 21), (2, 23)] and slots == 24  # Tokens 0..7 run; token 8 is drawn.
  parts = pi.lower_generate(CFG, sc, 8, 16)(Layout.on(0))
  assert parts["decode_extra"] == 4 and parts["layer_loop"] == "unrolled" and "decode" in parts
  # What the analytic tier is told per platform: CPU (and fp32) reads the segments' prefixes; bf16 on GPU
  # runs fused attention and its decode step reads the filled slots only (step t: slots 0 .. 16 + t).
  assert pi.decode_kv_slots(CFG, sc, 16, "cpu") == pytest.approx((17 + 19 + 21 + 23) / 4)
  bf16 = dataclasses.replace(CFG, dtype="bfloat16")
  assert pi.fused_attention(bf16, "gpu")
  assert pi.decode_kv_slots(bf16, sc, 16, "gpu") == pytest.approx(sum(16 + t + 1 for t in range(8)) / 8)
  assert pi.decode_kv_slots(dataclasses.replace(bf16, attention_impl="xla"), sc, 16, "gpu") == 20
  assert not pi.fused_attention(bf16, "cpu") and not pi.fused_attention(CFG, "gpu")
  assert pi.decode_kv_slots(CFG, dataclasses.replace(sc, decode="stacked"), 16, "cpu") == 25


def test_chunked_logprobs_counted_whole():
  """The LM head in chunks is a scan, which XLA counts once: the compiled tier adds the other chunks'
  share of the analytic head counts."""
  rows, seq = 8, 32
  lay = Layout.on(0, data=2, tensor=2)
  assert pi.logits_chunks(CFG, lay, rows, seq) == 1
  assert pi.logits_chunks(dataclasses.replace(CFG, logits_chunk=8), lay, rows, seq) == 4
  assert pi.logits_chunks(dataclasses.replace(CFG, logits_chunk=12), lay, rows, seq) == 3  # The last one padded.


def test_analytic_generation_projects_the_last_prompt_position_only():
  """The analytic tier's generation against the compiled sampler, with a vocabulary large enough that
  the LM head dominates (projecting all 32 prompt positions would triple the count): the prefill
  projects one position per row, and prefill + one decode step match the compiled sampler of M = 2
  within 20% (XLA also counts the draws' elementwise work)."""
  from search import CallSpec
  from search.estimator import analytic_counts
  cfg = dataclasses.replace(CFG, vocab_size=4096)
  b, p = 8, 32
  lay = Layout.on(0)
  comp = _counts(pi.lower_sampler(cfg, SamplingConfig(max_new_tokens=2, bucket=32), b, p, lay), lay, 8)["flops"]
  # The sampler runs M - 1 decode steps (token M - 1 is drawn, never run); the analytic tier counts M.
  spec = CallSpec("g", "m", "generate", b, pi.model_shape(cfg, "lm"), prompt_len=p, new_tokens=1,
                  decode_kv_slots=p + 1)
  assert analytic_counts(spec, lay).flops == pytest.approx(comp, rel=0.2)

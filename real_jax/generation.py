"""Batched sampling with a pre-allocated KV cache (DESIGN.md section 5).

`generate(model, prompt_BP, prompt_mask_BP, rng, config, layout)` runs, as one jitted call under
`layout`: prefill of the (left-padded, bucketed) prompts, then decode steps in `lax.while_loop`s
that stop when every row has emitted EOS or `max_new_tokens` are out. Shapes are static: the
cache holds `P + max_new_tokens - 1` slots, P the prompt bucket, so only a handful of programs
compile (one per bucket, batch size, layout and sampling config; see `bucket_length`).

The decode loop is bound by HBM reads: every step reads all weights and the cache. So the
default loop ("layered", see `SamplingConfig.decode`) gives each layer its own weight arrays
(sliced once before the loop) and its own cache buffer, and runs as a few segments whose
attention reads a static cache prefix that grows with the sequence (`segment_ends`).

Shape legend: B rows (prompts x n samples), P prompt bucket, M max_new_tokens, T = P + M, V vocab.

Returned `Rollout` (every [B, T] field is over the whole sequence, prompt then response):
* tokens: prompt (left-padded with `pad_id`) then the response; after a row's EOS, `pad_id`.
* prompt_mask: True at real prompt tokens.
* response_mask: True at generated tokens up to and including the EOS token.
* logprobs: **shifted alignment**: `logprobs[:, t]` is log p(tokens[:, t+1] | tokens[:, :t+1]), so it
  is meaningful where `response_mask[:, t+1]` (the same alignment `inference.logprobs` returns;
  the last column is 0). Log-probs are float32 `log_softmax(logits / temperature)` of the
  **unmasked** temperature-scaled distribution: top-k / top-p only restrict which token is drawn,
  not the log-prob reported, because that unmasked distribution is exactly what the trainer
  recomputes from the same forward pass. (Greedy decoding reports log_softmax(logits /
  temperature) of the argmax token too.)
* ended_with_eos: [B] True where the response contains EOS (False: truncated at M tokens).
* response_len: [B] number of generated tokens (EOS included).

n samples per prompt (GRPO groups): rows are group-major, rows [i*n, (i+1)*n) are prompt i.
Determinism: the draw at step t uses `fold_in(rng, t)`; the same key, config and inputs give the
same rollout (threefry random bits do not depend on the sharding).

Prompts must be left-padded (each row's last prompt column is a real token); `pad_prompts` makes
such a batch from lists of token ids and pads to the bucket length.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from real_jax._calls import batch_sharding, cached, compute_params, shape_key, sharding_hook, split_model
from real_jax.models.transformer import KVCache, activation_constraints, layer_arrays
from sharding import Layout, activation_sharding, shardings_for


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to sample.

  max_new_tokens: M, the response budget.
  temperature: logits are divided by it (> 0).
  top_k: keep the k largest logits (0: off).
  top_p: keep the smallest set of tokens whose probability reaches top_p (1.0: off); applied after
    top-k, on the temperature-scaled distribution.
  greedy: argmax instead of sampling.
  eos_id: an id or ids that end a response (None: always M tokens).
  pad_id: written after EOS (and left of short prompts by `pad_prompts`).
  n: samples per prompt (rows are repeated group-major).
  bucket: prompt lengths are rounded up to a multiple of this (and to a power of two below it).
  decode: how the decode loop holds weights and cache (same tokens and log-probs either way):
    "layered" (default): each layer's weights are sliced out of the stacked parameters once,
    before the loop (in a bf16 model that stores bf16 weights this is one extra copy of the layer
    weights for the call; a model that stores fp32 masters casts into them instead of into a
    stacked copy), and each layer has its own cache buffer, read before the new slot is
    written. The loop is split into `decode_segments` while loops; segment j's attention reads a
    static cache prefix that ends where segment j does, so reads grow with the sequence.
    "stacked": one [L, B, S, K, H] cache written then read in place and stacked weights sliced in
    the loop, every step reading all P + M slots (the earlier loop; kept as a benchmark baseline).
  decode_segments: number of decode while loops ("layered"); each is one more compiled copy of
    the decode step, and the cache slots read per step exceed the filled ones by about
    M / (2 * decode_segments) on average.
  scan_layers: "stacked" only: True scans the layer loop of the decode step, False unrolls it.
  """

  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  eos_id: int | tuple[int, ...] | None = None
  pad_id: int = 0
  n: int = 1
  bucket: int = 64
  decode: str = "layered"
  decode_segments: int = 4
  scan_layers: bool = False

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if not self.temperature > 0:
      raise ValueError(f"SamplingConfig.temperature must be > 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
    if self.n < 1 or self.bucket < 1:
      raise ValueError(f"SamplingConfig.n and .bucket must be >= 1, got n={self.n} bucket={self.bucket}")
    if self.decode not in ("layered", "stacked"):
      raise ValueError(f"SamplingConfig.decode must be 'layered' or 'stacked', got {self.decode!r}")
    if self.decode_segments < 1:
      raise ValueError(f"SamplingConfig.decode_segments must be >= 1, got {self.decode_segments}")

  @property
  def eos_ids(self) -> tuple[int, ...]:
    if self.eos_id is None:
      return ()
    return (self.eos_id,) if isinstance(self.eos_id, int) else tuple(self.eos_id)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rollout:
  """What `generate` returns; see the module docstring for the alignment of `logprobs`."""

  tokens: jax.Array          # [B, T] int32
  prompt_mask: jax.Array     # [B, T] bool
  response_mask: jax.Array   # [B, T] bool
  logprobs: jax.Array        # [B, T] float32, logprobs[:, t] scores tokens[:, t + 1]
  ended_with_eos: jax.Array  # [B] bool
  response_len: jax.Array    # [B] int32

  @property
  def attention_mask(self) -> jax.Array:
    return self.prompt_mask | self.response_mask

  @property
  def logprob_mask(self) -> jax.Array:
    """[B, T] True where logprobs[:, t] scores a response token (response_mask shifted left by 1)."""
    return jnp.pad(self.response_mask[:, 1:], ((0, 0), (0, 1)))


def bucket_length(length: int, bucket: int = 64) -> int:
  """Prompt length rounded up: powers of two below `bucket`, multiples of `bucket` above."""
  if length <= bucket:
    p = 1
    while p < length:
      p *= 2
    return min(p, bucket)
  return -(-length // bucket) * bucket


def pad_prompts(prompts: Sequence[Sequence[int]], *, bucket: int = 64, pad_id: int = 0,
                length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to `length` (default: the bucket of the longest). Returns (tokens, mask)."""
  longest = max(len(p) for p in prompts)
  if min(len(p) for p in prompts) < 1:
    raise ValueError("pad_prompts: every prompt needs at least one token")
  length = bucket_length(longest, bucket) if length is None else length
  if longest > length:
    raise ValueError(f"pad_prompts: a prompt has {longest} tokens, more than length={length}")
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), bool)
  for i, p in enumerate(prompts):
    tokens[i, length - len(p):] = p
    mask[i, length - len(p):] = True
  return tokens, mask


# ---------------------------------------------------------------------------------------------
# Sampling from one step's logits.


def filter_logits(logits_BV: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Logits with everything outside the top-k / top-p set at -inf (ties at the threshold kept)."""
  x = logits_BV
  neg = jnp.array(-jnp.inf, x.dtype)
  if top_k and top_k < x.shape[-1]:
    kth = jax.lax.top_k(x, top_k)[0][:, -1:]
    x = jnp.where(x < kth, neg, x)
  if top_p < 1.0:
    srt = -jnp.sort(-x, axis=-1)
    probs = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted entry
    keep = before < top_p
    thresh = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x < thresh, neg, x)
  return x


def sample_token(key: jax.Array, logits_BV: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
  """(token [B] int32, its log-prob [B] under log_softmax(logits / temperature), unmasked).

  The log-prob is the token's scaled logit minus the row's logsumexp: no [B, V] log-softmax is
  written out (B x V fp32 is 155 MB a step for 256 rows of Qwen's 152k vocabulary). The draw is
  `jax.random.categorical` over the whole row. A two-level draw over vocabulary chunks
  (bench/sampling.py) took 237 against 307 us a draw for 256 rows of Qwen's vocabulary on one H100,
  under 3% of a decode step; not adopted (bench/results/sampling-h100.json).
  """
  scaled = logits_BV.astype(jnp.float32) / jnp.float32(cfg.temperature)
  lse_B = jax.nn.logsumexp(scaled, axis=-1)
  if cfg.greedy:
    tok = jnp.argmax(scaled, axis=-1)
  elif cfg.top_k and cfg.top_k < scaled.shape[-1]:
    # Draw among the k candidates only (sorting k values, not V, for top-p).
    vals, idx = jax.lax.top_k(scaled, cfg.top_k)
    vals = filter_logits(vals, 0, cfg.top_p)
    choice = jax.random.categorical(key, vals, axis=-1)
    tok = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
  else:
    tok = jax.random.categorical(key, filter_logits(scaled, 0, cfg.top_p), axis=-1)
  tok = tok.astype(jnp.int32)
  return tok, jnp.take_along_axis(scaled, tok[:, None], axis=-1)[:, 0] - lse_B


# ---------------------------------------------------------------------------------------------
# The jitted sampler.


def segment_ends(steps: int, segments: int) -> list[int]:
  """Ends (exclusive) of up to `segments` near-equal runs of decode steps 0..steps-1."""
  return sorted({-(-steps * (j + 1) // segments) for j in range(segments)} - {0})


def draw_token(cfg: SamplingConfig, eos_K: jax.Array, rng: jax.Array, t, logits_BV, out_BM, lp_BM, done_B):
  """Token t from logits_BV into the [B, M] outputs: pad and log-prob 0 for rows already done.
  Returns (token, live: the rows not yet done before it, i.e. its attention mask, out, log-probs, done)."""
  tok, lp = sample_token(jax.random.fold_in(rng, t), logits_BV, cfg)
  tok = jnp.where(done_B, cfg.pad_id, tok)
  lp = jnp.where(done_B, 0.0, lp)
  out_BM = jax.lax.dynamic_update_slice_in_dim(out_BM, tok[:, None], t, axis=1)
  lp_BM = jax.lax.dynamic_update_slice_in_dim(lp_BM, lp[:, None], t, axis=1)
  live_B = ~done_B
  done_B = done_B | jnp.any(tok[:, None] == eos_K[None, :], axis=-1)
  return tok, live_B, out_BM, lp_BM, done_B


def layered_decode_step(model, layer_params, cfg: SamplingConfig, eos_K, rng, kv_len, carry):
  """One iteration of the layered decode loop: token t (at slot P + t) through every layer with the
  per-layer weights and cache, project, draw token t + 1. `carry` = (t, cache, token, live, out, log-probs,
  done), returned advanced. The sampler's while loops run it; `plan_inputs` lowers it alone for the
  plan estimator, so what is priced is what runs."""
  t, cache, tok, live, out_BM, lp_BM, done = carry
  h, cache = model.hidden(tok[:, None], attention_mask_BT=live[:, None], cache=cache, layer_params=layer_params,
                          kv_len=kv_len)
  return (t + 1, cache) + draw_token(cfg, eos_K, rng, t + 1, model.project(h)[:, 0], out_BM, lp_BM, done)


def _sample_fn(graphdef, cfg: SamplingConfig, layout: Layout):
  """The pure function (state, prompt_BP, mask_BP, rng) -> Rollout, traced under `layout`."""
  eos = jnp.asarray(cfg.eos_ids or (-1,), jnp.int32)
  layered = cfg.decode == "layered"

  def run(state, prompt_BP, mask_BP, rng):
    with activation_constraints(sharding_hook(layout)):
      mcfg = model_config(graphdef, state)
      model = nnx.merge(graphdef, compute_params(state, mcfg.dtype))
      b, p = prompt_BP.shape
      m = cfg.max_new_tokens
      mask_BP = mask_BP.astype(bool)
      if layered:
        # Sliced once, outside every loop: the decode step never slices stacked weights. Sliced
        # before the cast, so fp32 masters are cast straight into per-layer arrays.
        stacked = nnx.merge(graphdef, state).layers.arrays()
        lps = [compute_params(lp, mcfg.dtype) for lp in layer_arrays(stacked, mcfg.n_layers)]
        fwd = functools.partial(model.hidden, layer_params=lps)
        cache = KVCache.zeros(mcfg, b, p + m - 1, per_layer=True)  # token M-1 is never run
      else:
        fwd = functools.partial(model.hidden, scan_layers=cfg.scan_layers)
        cache = KVCache.zeros(mcfg, b, p + m)
      cache = _constrain_cache(cache, layout)
      # Prefill: hidden states of the whole prompt, logits of the last column only.
      h_BPD, cache = (fwd if layered else model.hidden)(prompt_BP, attention_mask_BT=mask_BP, cache=cache)
      logits_BV = model.project(h_BPD[:, -1:])[:, 0]

      draw = functools.partial(draw_token, cfg, eos, rng)

      out_BM = jnp.full((b, m), cfg.pad_id, jnp.int32)
      lp_BM = jnp.zeros((b, m), jnp.float32)
      done = jnp.zeros((b,), bool)
      if layered:
        # Token 0 from the prefill; then iteration t runs token t at slot P + t and draws token t + 1,
        # so the loop carries tokens, not logits, and token M - 1 is never run.
        c = (jnp.zeros((), jnp.int32), cache) + draw(0, logits_BV, out_BM, lp_BM, done)

        def body_for(kv_len):
          return functools.partial(layered_decode_step, model, lps, cfg, eos, rng, kv_len)

        # Segment [a, end) runs tokens a..end-1 at slots < P + end - 1: a static read of P + end - 1.
        for end in segment_ends(m - 1, cfg.decode_segments):
          c = jax.lax.while_loop(lambda c, end=end: (c[0] < end) & ~jnp.all(c[6]), body_for(p + end - 1), c)
        out_BM, lp_BM = c[4], c[5]
      else:
        def body(c):
          t, cache, logits_BV, out_BM, lp_BM, done = c
          tok, live, out_BM, lp_BM, done = draw(t, logits_BV, out_BM, lp_BM, done)
          h, cache = fwd(tok[:, None], attention_mask_BT=live[:, None], cache=cache)
          return t + 1, cache, model.project(h)[:, 0], out_BM, lp_BM, done

        c = (jnp.zeros((), jnp.int32), cache, logits_BV, out_BM, lp_BM, done)
        c = jax.lax.while_loop(lambda c: (c[0] < m) & ~jnp.all(c[5]), body, c)
        out_BM, lp_BM = c[3], c[4]

      is_eos = jnp.any(out_BM[:, :, None] == eos[None, None, :], axis=-1)
      # Response: tokens up to and including the first EOS.
      after_eos = (jnp.cumsum(is_eos, axis=1) - is_eos) > 0
      resp_BM = ~after_eos
      ended = jnp.any(is_eos, axis=1)
      tokens = jnp.concatenate([prompt_BP.astype(jnp.int32), out_BM], axis=1)
      prompt_mask = jnp.concatenate([mask_BP, jnp.zeros((b, m), bool)], axis=1)
      response_mask = jnp.concatenate([jnp.zeros((b, p), bool), resp_BM], axis=1)
      lp_BM = jnp.where(resp_BM, lp_BM, 0.0)
      logprobs = jnp.concatenate([jnp.zeros((b, p - 1), jnp.float32), lp_BM, jnp.zeros((b, 1), jnp.float32)], axis=1)
      return Rollout(tokens, prompt_mask, response_mask, logprobs, ended, jnp.sum(resp_BM, axis=1).astype(jnp.int32))

  return run


def model_config(graphdef, state):
  """The ModelConfig of a Transformer given as (graphdef, state) (static data of the graphdef)."""
  return nnx.merge(graphdef, state).cfg


def cache_shardings(cache: KVCache, layout: Layout) -> KVCache:
  """A KVCache of shardings for `cache` (arrays or shapes): as its logical axes say (batch over
  data/fsdp, kv_heads over tensor); the index replicated."""
  names = KVCache.logical_axes(cache.per_layer, len(cache.k) if cache.per_layer else 0)

  def s(x, n):
    return activation_sharding(layout, n, tuple(x.shape))

  def kv(xs, ns):
    return tuple(map(s, xs, ns)) if cache.per_layer else s(xs, ns)
  return KVCache(kv(cache.k, names.k), kv(cache.v, names.v), s(cache.valid, names.valid), layout.replicated())


def _constrain_cache(cache: KVCache, layout: Layout) -> KVCache:
  """The cache laid out as `cache_shardings` says."""
  sh = cache_shardings(cache, layout)
  c = jax.lax.with_sharding_constraint
  return KVCache(c(cache.k, sh.k), c(cache.v, sh.v), c(cache.valid, sh.valid), cache.index)


def generate(model, prompt_BP, prompt_mask_BP, rng: jax.Array, config: SamplingConfig,
             layout: Layout | None = None) -> Rollout:
  """Samples `config.n` responses per prompt under `layout` (see the module docstring).

  model: a Transformer (lm head) or its (graphdef, state); the state may be fp32 master weights
    (cast once to the model's compute dtype inside the call).
  prompt_BP, prompt_mask_BP: left-padded prompts; P is rounded up to its bucket here (more left
    padding) so that only a few shapes compile.
  """
  layout = layout if layout is not None else Layout.on(0)
  graphdef, state = split_model(model)
  prompt_BP = jnp.asarray(prompt_BP, jnp.int32)
  mask_BP = jnp.asarray(prompt_mask_BP, bool)
  p = prompt_BP.shape[1]
  pb = bucket_length(p, config.bucket)
  if pb != p:
    prompt_BP = jnp.pad(prompt_BP, ((0, 0), (pb - p, 0)), constant_values=config.pad_id)
    mask_BP = jnp.pad(mask_BP, ((0, 0), (pb - p, 0)))
  if config.n > 1:
    prompt_BP = jnp.repeat(prompt_BP, config.n, axis=0)
    mask_BP = jnp.repeat(mask_BP, config.n, axis=0)
  mcfg = model_config(graphdef, state)
  if pb + config.max_new_tokens > mcfg.max_seq_len:
    raise ValueError(f"generate: prompt bucket {pb} + max_new_tokens {config.max_new_tokens} exceeds the "
                     f"model's max_seq_len {mcfg.max_seq_len}")
  fn = sampler(graphdef, state, prompt_BP.shape, config, layout)
  return fn(state, prompt_BP, mask_BP, rng)


def sampler(graphdef, state, shape_BP: tuple[int, int], config: SamplingConfig, layout: Layout):
  """The jitted sampler for these shapes under `layout` (cached by layout, config and shapes).

  Shardings: parameters from `shardings_for`; prompts, masks and every Rollout field with the
  batch over (data, fsdp); the KV cache inside with batch over (data, fsdp) and kv_heads over
  tensor (replicated when they do not divide).
  """
  b, p = shape_BP
  key = ("generate", graphdef, layout, config, tuple(shape_BP), shape_key(state))

  def build():
    st_sh = shardings_for(state, layout)
    bsh = batch_sharding(layout, (b, p))
    rsh = batch_sharding(layout, (b,))
    out_sh = Rollout(bsh, bsh, bsh, bsh, rsh, rsh)
    return jax.jit(_sample_fn(graphdef, config, layout), in_shardings=(st_sh, bsh, bsh, layout.replicated()),
                   out_shardings=out_sh)

  return cached(key, build)

"""A LLaMA-family decoder in Flax NNX, with layer-stacked parameters and an optional KV cache.

Shape legend: see `real_jax/models/config.py` (B T S D N K H G F V L).

Design:
* Parameters carry *logical* axis names only, as `logical_axes` metadata on each `nnx.Param`
  (`sharding.rules` maps them to mesh axes). Flax's own `sharding_names` metadata is not used, so
  that creating a Variable never needs a mesh context.
* The L decoder layers are one `Layers` module whose parameters are stacked along a leading
  `layers` axis. Full-sequence passes unroll the layer loop over static per-layer slices
  (`ModelConfig.unroll_layers`, the default; faster on GPU) or run it with `jax.lax.scan` (one
  layer traced and compiled, whatever L is).
* One forward path (`Transformer.forward`) serves training, inference and generation prefill and
  decode; the cache only changes which keys are visible. So log-probs of the sampler and of the
  trainer come from the same code.
* Attention masking is slot based. Keys live in slots 0..S-1 (the cache, or the sequence itself
  without a cache); the query at slot q may see slot s iff s <= q and slot s holds a real token.
  A query at a padded slot sees only itself, so no row is ever empty. RoPE uses `positions`
  separately, so left-padded prompts get positions 0, 1, ... from their first real token.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from real_jax.models.config import ModelConfig

Array = jax.Array

# ---------------------------------------------------------------------------------------------
# Activation sharding hook. Model code names logical axes; the caller (a call under a Layout) sets
# how they map to the mesh with `activation_constraints(fn)`, fn(x, logical_axes) -> x.

_CONSTRAIN: contextvars.ContextVar[Any] = contextvars.ContextVar("real_jax_constrain", default=None)


@contextlib.contextmanager
def activation_constraints(fn):
  """Within the block, `constrain(x, names)` calls `fn(x, names)` (e.g. a sharding constraint)."""
  token = _CONSTRAIN.set(fn)
  try:
    yield
  finally:
    _CONSTRAIN.reset(token)


def constrain(x: Array, names: tuple[str | None, ...]) -> Array:
  fn = _CONSTRAIN.get()
  return x if fn is None else fn(x, names)


def axis_shards(name: str) -> int:
  """How many ways the active constraint function splits logical axis `name` (1 outside one, or
  when the function does not say: `fn.shards`, a dict, set by `_calls.sharding_hook`)."""
  return int(getattr(_CONSTRAIN.get(), "shards", {}).get(name, 1))


# ---------------------------------------------------------------------------------------------
# Building blocks (pure functions on arrays).


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
  """RMSNorm computed in float32, returned in x's dtype (HF LlamaRMSNorm semantics)."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (scale.astype(jnp.float32) * y).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> Array:
  """Inverse frequencies [H/2], with LLaMA-3.1 frequency-dependent scaling when configured."""
  h = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  sc = cfg.rope_scaling
  if sc is None:
    return inv
  old = sc.original_max_position_embeddings
  low_wavelen = old / sc.low_freq_factor
  high_wavelen = old / sc.high_freq_factor
  wavelen = 2 * jnp.pi / inv
  scaled = jnp.where(wavelen > low_wavelen, inv / sc.factor, inv)
  smooth = (old / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
  smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, scaled)


def apply_rope(x_BTnH: Array, positions_BT: Array, inv_freq: Array) -> Array:
  """Rotary embedding, rotate-half convention (HF's), computed in float32."""
  ang_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  cos = jnp.cos(ang_BTh)[:, :, None, :]
  sin = jnp.sin(ang_BTh)[:, :, None, :]
  xf = x_BTnH.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTnH.dtype)


def attention_kernel(impl: str | None, dtype, platform: str | None = None) -> str:
  """The attention implementation `attention` (and the fused decode step) names for `impl` (a model's
  `attention_impl`; None = auto) at compute `dtype` on `platform` (default this machine's backend).

  Auto is cuDNN's fused kernel, named explicitly, for bf16/fp16 on GPU: left to
  `implementation=None`, JAX 0.11 runs the XLA path, which on one H100 made a Qwen2.5-0.5B train step
  1.3x slower and ran out of memory at 32 rows x 512 tokens (bench/results/train-qwen-h100.json). XLA
  everywhere else. The plan estimator prices kernels by the same rule (`plan_inputs.fused_attention`).
  """
  if impl is not None:
    return impl
  platform = platform or jax.default_backend()
  return "xla" if jnp.dtype(dtype) == jnp.float32 or platform != "gpu" else "cudnn"


def attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, mask_BTS: Array, impl: str | None,
              kv_lengths_B: Array | None = None) -> Array:
  """Grouped-query attention through `jax.nn.dot_product_attention` (cuDNN on GPU where it applies;
  XLA if cuDNN fails to trace and the choice was automatic). kv_lengths_B: keys at and beyond each
  row's length are never read (the kernel's key/value sequence lengths); None: all S."""
  mask = mask_BTS[:, None, :, :]
  kw = {} if kv_lengths_B is None else {"key_value_seq_lengths": kv_lengths_B}
  auto = impl is None
  impl = attention_kernel(impl, q_BTNH.dtype)
  try:
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask, implementation=impl, **kw)
  except (NotImplementedError, ValueError, RuntimeError):
    if not auto or impl == "xla":
      raise
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask, implementation="xla", **kw)


def fused_decode_attention(q_B1NH: Array, k_BSKH: Array, v_BSKH: Array, mask_BS: Array, kv_len: Array | None,
                           impl: str | None) -> Array:
  """One query token per row against a whole per-layer cache through the fused kernel (`attention`).

  kv_len: the number of filled slots (a scalar; slots at and beyond it are never read), passed as the
  kernel's key/value sequence lengths, so cuDNN stops reading there: timed alone on one H100, half
  the slots filled took 0.8 of the time of all of them (bench/results/decode-attention-h100.json);
  None reads every slot (the mask still decides). Folding each kv head's query heads into the query
  axis (G query rows, K heads: the keys and values read once per kv head) was slower there (66 against
  44 us a layer for Qwen2.5-0.5B's shape: 7x fewer, longer blocks), so the query heads stay heads.
  Returns [B, 1, N, H].
  """
  b, t = q_B1NH.shape[:2]
  if t != 1:
    raise ValueError(f"fused_decode_attention: one query token per row, got T={t}")
  lengths = None if kv_len is None else jnp.full((b,), kv_len, jnp.int32)
  return attention(q_B1NH, k_BSKH, v_BSKH, mask_BS[:, None, :], impl, lengths)


def decode_on_full_cache(cfg: ModelConfig, dtype, platform: str | None = None) -> bool:
  """Whether a decode step over a per-layer cache uses the fused (cuDNN) attention kernel on the
  per-layer buffer (write the new slot, then attend up to the filled length: `fused_decode_attention`)
  rather than `decode_attention` on a static prefix.

  Yes for bf16/fp16 on GPU (`platform`, default this machine's backend) unless
  `cfg.attention_impl == "xla"`. Timed alone on one H100
  (bench/results/decode-attention-h100.json), cuDNN read a 511-slot cache 3.9x faster than the
  multiply-reduce form for Qwen2.5-0.5B's shape (256 rows, 2 kv heads: 48.5 vs 190 us a layer) and
  1.27x for LLaMA-7B's (64 rows, 32 kv heads).
  """
  platform = platform or jax.default_backend()
  return cfg.attention_impl != "xla" and jnp.dtype(dtype) != jnp.float32 and platform == "gpu"


def decode_attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, mask_BTS: Array,
                     k_new_BTKH: Array | None = None, v_new_BTKH: Array | None = None) -> Array:
  """Attention for a few query tokens against a long cache, as fused multiply-reduce (no dot).

  Decode is bound by reading the cache: written as broadcast-multiply + reduce, XLA fuses the
  read of the cache (or of a static prefix of it) into the reduction, so it is read once per step
  instead of being copied out first. Same math as the XLA path of `jax.nn.dot_product_attention`
  (fp32 scores and softmax, probabilities cast to the value dtype before the PV product).

  k_new_BTKH / v_new_BTKH (decode with T = 1 only): the query token's own key/value, not yet in
  the cache; it always sees itself, so its score joins the softmax beside the masked cache slots.
  This lets the caller read the cache *before* writing the new slot (no read-after-write of the
  same buffer inside a step).
  """
  b, t, n, h = q_BTNH.shape
  k = k_BSKH.shape[2]
  g = n // k
  f32 = jnp.float32
  scale = f32(1.0 / (h ** 0.5))
  q = q_BTNH.reshape(b, t, 1, k, g, h).astype(f32)
  s_BTSKG = jnp.sum(q * k_BSKH[:, None, :, :, None, :].astype(f32), axis=-1) * scale
  big_neg = jnp.finfo(f32).min / 2
  s_BTSKG = jnp.where(mask_BTS[:, :, :, None, None], s_BTSKG, big_neg)
  vdt = v_BSKH.dtype
  if k_new_BTKH is None:
    p_BTSKG = jax.nn.softmax(s_BTSKG, axis=2).astype(vdt)
    o = jnp.sum(p_BTSKG[..., None].astype(f32) * v_BSKH[:, None, :, :, None, :].astype(f32), axis=2)
    return o.reshape(b, t, n, h).astype(q_BTNH.dtype)
  if t != 1:
    raise ValueError(f"decode_attention: k_new/v_new need one query token, got T={t}")
  s_new_BTKG = jnp.sum(q[:, :, 0] * k_new_BTKH[:, :, :, None, :].astype(f32), axis=-1) * scale
  m_BTKG = jnp.maximum(jnp.max(s_BTSKG, axis=2), s_new_BTKG)
  e_BTSKG = jnp.exp(s_BTSKG - m_BTKG[:, :, None])
  e_new_BTKG = jnp.exp(s_new_BTKG - m_BTKG)
  denom_BTKG = jnp.sum(e_BTSKG, axis=2) + e_new_BTKG
  p_BTSKG = (e_BTSKG / denom_BTKG[:, :, None]).astype(vdt)
  p_new_BTKG = (e_new_BTKG / denom_BTKG).astype(vdt)
  o = jnp.sum(p_BTSKG[..., None].astype(f32) * v_BSKH[:, None, :, :, None, :].astype(f32), axis=2)
  o = o + p_new_BTKG[..., None].astype(f32) * v_new_BTKH[:, :, :, None, :].astype(f32)
  return o.reshape(b, t, n, h).astype(q_BTNH.dtype)


def slot_mask(q_slot_BT: Array, key_valid_BS: Array) -> Array:
  """[B, T, S] bool: query at slot q sees key slot s iff s <= q and (s holds a real token or s == q)."""
  s_idx = jnp.arange(key_valid_BS.shape[1])[None, None, :]
  q = q_slot_BT[:, :, None]
  return (s_idx <= q) & (key_valid_BS[:, None, :] | (s_idx == q))


# ---------------------------------------------------------------------------------------------
# KV cache.


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Pre-allocated keys/values for all layers, plus which slots hold real tokens.

  k, v: stacked [L, B, S, K, H] arrays, or (per_layer) tuples of L arrays [B, S, K, H], one
  buffer per layer (the decode loop of generation: each layer's buffer is read, then updated in
  place, without slicing a stacked array); valid: [B, S] bool; index: [] int32, the next slot to
  write.
  """

  k: Array | tuple[Array, ...]
  v: Array | tuple[Array, ...]
  valid: Array
  index: Array

  @property
  def per_layer(self) -> bool:
    return isinstance(self.k, (tuple, list))

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, length: int, dtype=None, *, per_layer: bool = False) -> KVCache:
    dtype = jnp.dtype(dtype or cfg.dtype)
    if per_layer:
      shape = (batch, length, cfg.n_kv_heads, cfg.head_dim)
      k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
      v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
    else:
      shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
      k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
    return cls(k, v, jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32))

  @staticmethod
  def logical_axes(per_layer: bool = False, n_layers: int = 0) -> KVCache:
    """Logical axes of each field (for sharding the cache with `sharding.rules`).

    per_layer: axes of a per-layer cache of `n_layers` layers (a tuple of axes per field).
    """
    if per_layer:
      kv = ("batch", "cache_seq", "kv_heads", "head_dim")
      return KVCache((kv,) * n_layers, (kv,) * n_layers, ("batch", "cache_seq"), ())  # type: ignore[arg-type]
    kv = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")
    return KVCache(kv, kv, ("batch", "cache_seq"), ())  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Modules.


def _param(rngs: nnx.Rngs | None, init, shape, dtype, axes) -> nnx.Param:
  value = init(rngs.params(), shape, dtype) if rngs is not None else init(None, shape, dtype)
  return nnx.Param(value, logical_axes=axes)


def _normal(std):
  return lambda key, shape, dtype: (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _ones(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


def _zeros(key, shape, dtype):
  del key
  return jnp.zeros(shape, dtype)


class Layers(nnx.Module):
  """All L decoder layers, parameters stacked along a leading `layers` axis."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, init_std: float = 0.02):
    l, d, n, k, h, f = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    pd = jnp.dtype(cfg.param_dtype)
    w = _normal(init_std)
    self.attn_norm = _param(rngs, _ones, (l, d), pd, ("layers", "embed"))
    self.wq = _param(rngs, w, (l, d, n, h), pd, ("layers", "embed", "heads", "head_dim"))
    self.wk = _param(rngs, w, (l, d, k, h), pd, ("layers", "embed", "kv_heads", "head_dim"))
    self.wv = _param(rngs, w, (l, d, k, h), pd, ("layers", "embed", "kv_heads", "head_dim"))
    self.wo = _param(rngs, w, (l, n, h, d), pd, ("layers", "heads", "head_dim", "embed"))
    if cfg.qkv_bias:
      self.bq = _param(rngs, _zeros, (l, n, h), pd, ("layers", "heads", "head_dim"))
      self.bk = _param(rngs, _zeros, (l, k, h), pd, ("layers", "kv_heads", "head_dim"))
      self.bv = _param(rngs, _zeros, (l, k, h), pd, ("layers", "kv_heads", "head_dim"))
    self.mlp_norm = _param(rngs, _ones, (l, d), pd, ("layers", "embed"))
    self.w_gate = _param(rngs, w, (l, d, f), pd, ("layers", "embed", "mlp"))
    self.w_up = _param(rngs, w, (l, d, f), pd, ("layers", "embed", "mlp"))
    self.w_down = _param(rngs, w, (l, f, d), pd, ("layers", "mlp", "embed"))

  def arrays(self) -> dict[str, Array]:
    return {name: v.get_value() for name, v in vars(self).items() if isinstance(v, nnx.Param)}


def _layer(cfg: ModelConfig, inv_freq, x_BTD, p, positions_BT, mask_BTS, kv_in, index, old_mask_BS=None,
           kv_len=None):
  """One decoder layer.

  kv_in: None (no cache); (k_LBSKH, v_LBSKH, layer), the whole stacked cache and this layer's
  index: the T new keys/values are written in place at slots [index, index + T) of that layer
  first, then the layer's slice is read back for attention; or (k_BSKH, v_BSKH, None), this
  layer's own buffers (a per-layer cache): with T = 1 and `old_mask_BS` (which earlier slots the
  token sees) the first `kv_len` slots are read *before* the new key/value is written, the token's
  own key/value joining the softmax directly (`decode_attention`); otherwise written, then read.
  Returns (x, (k, v) updated, or None).
  """
  dt = x_BTD.dtype
  c = lambda name: p[name].astype(dt)  # noqa: E731
  h_BTD = rms_norm(x_BTD, p["attn_norm"], cfg.rms_eps)
  q = jnp.einsum("BTD,DNH->BTNH", h_BTD, c("wq"))
  k = jnp.einsum("BTD,DKH->BTKH", h_BTD, c("wk"))
  v = jnp.einsum("BTD,DKH->BTKH", h_BTD, c("wv"))
  if cfg.qkv_bias:
    q, k, v = q + c("bq"), k + c("bk"), v + c("bv")
  q = constrain(apply_rope(q, positions_BT, inv_freq), ("batch", "seq", "heads", "head_dim"))
  k = constrain(apply_rope(k, positions_BT, inv_freq), ("batch", "seq", "kv_heads", "head_dim"))
  kv_out = None
  if kv_in is None:
    o = attention(q, k, v, mask_BTS, cfg.attention_impl)
  elif kv_in[2] is None:  # Per-layer buffers.
    k_l, v_l, _ = kv_in
    zero = jnp.zeros((), jnp.int32)
    start = (zero, jnp.asarray(index, jnp.int32), zero, zero)
    if q.shape[1] == 1 and old_mask_BS is not None and decode_on_full_cache(cfg, dt):
      # Decode step through the fused kernel: write the new slot in place, then attend over the buffer
      # up to the filled length (index + 1: the kernel stops reading there; a static prefix slice would
      # be copied out for the custom call, costing more than it saves).
      k_l = jax.lax.dynamic_update_slice(k_l, k.astype(k_l.dtype), start)
      v_l = jax.lax.dynamic_update_slice(v_l, v.astype(v_l.dtype), start)
      own_BS = jnp.arange(k_l.shape[1], dtype=jnp.int32)[None, :] == jnp.asarray(index, jnp.int32)
      o = fused_decode_attention(q, k_l.astype(dt), v_l.astype(dt), old_mask_BS | own_BS,
                                 jnp.asarray(index, jnp.int32) + 1, cfg.attention_impl)
    elif q.shape[1] == 1 and old_mask_BS is not None:  # Decode step: read the old prefix, then write.
      n = k_l.shape[1] if kv_len is None else kv_len
      o = decode_attention(q, k_l[:, :n].astype(dt), v_l[:, :n].astype(dt), old_mask_BS[:, None, :n], k, v)
      # The writes below depend on the read above (through o), so they can happen in place: XLA
      # never needs a copy of the buffer to keep the old value for a reader not yet run.
      o, k_l, v_l = jax.lax.optimization_barrier((o, k_l, v_l))
      k_l = jax.lax.dynamic_update_slice(k_l, k.astype(k_l.dtype), start)
      v_l = jax.lax.dynamic_update_slice(v_l, v.astype(v_l.dtype), start)
    else:
      k_l = jax.lax.dynamic_update_slice(k_l, k.astype(k_l.dtype), start)
      v_l = jax.lax.dynamic_update_slice(v_l, v.astype(v_l.dtype), start)
      o = attention(q, k_l.astype(dt), v_l.astype(dt), mask_BTS, cfg.attention_impl)
    kv_out = (k_l, v_l)
  else:
    k_all, v_all, layer = kv_in
    zero = jnp.zeros((), jnp.int32)
    start = (jnp.asarray(layer, jnp.int32), zero, jnp.asarray(index, jnp.int32), zero, zero)
    k_all = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype)[None], start)
    v_all = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype)[None], start)
    keys = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False).astype(dt)
    values = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False).astype(dt)
    if q.shape[1] == 1:  # Decode step: bandwidth-bound, read the cache once.
      o = decode_attention(q, keys, values, mask_BTS)
    else:
      o = attention(q, keys, values, mask_BTS, cfg.attention_impl)
    kv_out = (k_all, v_all)
  if kv_in is not None and kv_in[2] is None:  # Contract (N, H) in storage order: no backend transposes wo.
    x_BTD = x_BTD + jax.lax.dot_general(o, c("wo"), (((2, 3), (0, 1)), ((), ())))
  else:
    x_BTD = x_BTD + jnp.einsum("BTNH,NHD->BTD", o, c("wo"))
  x_BTD = constrain(x_BTD, ("batch", "seq", "embed"))
  h_BTD = rms_norm(x_BTD, p["mlp_norm"], cfg.rms_eps)
  gate = jnp.einsum("BTD,DF->BTF", h_BTD, c("w_gate"))
  up = jnp.einsum("BTD,DF->BTF", h_BTD, c("w_up"))
  act = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))
  x_BTD = x_BTD + jnp.einsum("BTF,FD->BTD", act, c("w_down"))
  x_BTD = constrain(x_BTD, ("batch", "seq", "embed"))
  return x_BTD, kv_out


def layer_arrays(stacked: dict[str, Array], n_layers: int) -> list[dict[str, Array]]:
  """Layer i's parameters as their own arrays, from the `layers`-stacked ones.

  Split with one `lax.split` per parameter, whose gradient is one concatenate into the stacked
  shape. Static slices (`a[i]`) give the same forward, but each slice's gradient is a pad to the
  whole stack and the stacked gradient their sum; on GPU XLA fused that chain of L pads into the
  optimizer's reductions (the global norm), and a 7B train step at 16 x 256 tokens took 0.680 s at
  tensor=2 against 0.241 s with the split (2x H200; bench/results/train-split-h200.json).
  """
  out: list[dict[str, Array]] = [{} for _ in range(n_layers)]
  for name, a in stacked.items():
    if a.shape[0] != n_layers:
      raise ValueError(f"layer_arrays: parameter {name!r} stacks {a.shape[0]} layers, expected {n_layers}")
    for i, part in enumerate(jax.lax.split(a, [1] * n_layers, axis=0)):
      out[i][name] = part.reshape(a.shape[1:])
  return out


# Auto chunk (ModelConfig.logits_chunk = 0): at most this many float32 logits per device per chunk
# (2 GiB). Big chunks matter: each chunk's backward adds a [D, V] float32 weight gradient, so the
# chunk must hold thousands of tokens for that to stay small beside the chunk's matmuls.
AUTO_CHUNK_LOGITS = 1 << 29


def logits_chunk_size(cfg_chunk: int, b: int, t: int, v: int) -> int:
  """Positions per chunk for `chunked_logprobs`: `cfg_chunk` if set (capped at t); else t when the
  per-device rows x t x vocab fits AUTO_CHUNK_LOGITS, otherwise the largest chunk that fits, a
  divisor of t when one is at least half of that (no padding)."""
  if cfg_chunk:
    return min(cfg_chunk, t)
  rows = max(1, b // axis_shards("batch"))
  vocab = max(1, v // axis_shards("vocab"))
  limit = max(1, AUTO_CHUNK_LOGITS // (rows * vocab))
  if limit >= t:
    return t
  best = max(c for c in range(1, limit + 1) if t % c == 0)
  return best if 2 * best >= limit else limit


def _chunk_logits(h_BCD: Array, w_DV: Array, inv_temp: float) -> Array:
  logits = jnp.einsum("BCD,DV->BCV", h_BCD, w_DV, preferred_element_type=jnp.float32)
  return constrain(logits, ("batch", "seq", "vocab")) * inv_temp


def _target_hit(targets_BC: Array, v: int) -> Array:
  # A mask, not a gather: with the vocabulary split over devices it is a local sum + all-reduce.
  return jnp.arange(v, dtype=jnp.int32) == targets_BC[..., None]


def _logprob_chunk(h_BCD: Array, w_DV: Array, targets_BC: Array, inv_temp: float, entropy: bool):
  """(log p(targets), entropy or zeros, logsumexp), each [B, C], of one chunk."""
  x = _chunk_logits(h_BCD, w_DV, inv_temp)
  lse = jax.nn.logsumexp(x, axis=-1)
  picked = jnp.sum(jnp.where(_target_hit(targets_BC, x.shape[-1]), x, 0.0), axis=-1)
  ent = lse - jnp.sum(jnp.exp(x - lse[..., None]) * x, axis=-1) if entropy else jnp.zeros_like(lse)
  return picked - lse, ent, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _scan_logprobs(h_NBCD, w_DV, tg_NBC, inv_temp, entropy):
  return _scan_logprobs_fwd(h_NBCD, w_DV, tg_NBC, inv_temp, entropy)[0]


def _scan_logprobs_fwd(h_NBCD, w_DV, tg_NBC, inv_temp, entropy):
  def body(_, xs):
    return None, _logprob_chunk(xs[0], w_DV, xs[1], inv_temp, entropy)

  _, (lp, ent, lse) = jax.lax.scan(body, None, (h_NBCD, tg_NBC))
  return (lp, ent), (h_NBCD, w_DV, tg_NBC, ent, lse)


def _scan_logprobs_bwd(inv_temp, entropy, res, g):
  """Recomputes each chunk's logits; d logits = g_lp (onehot - p) - g_ent p (x - E_p[x]), both times
  1 / temperature. The [D, V] weight gradient is summed over chunks in float32."""
  h_NBCD, w_DV, tg_NBC, ent_NBC, lse_NBC = res
  g_lp, g_ent = g

  def body(dw_DV, xs):
    h_BCD, tg_BC, ent_BC, lse_BC, glp_BC, gent_BC = xs
    x = _chunk_logits(h_BCD, w_DV, inv_temp)
    p = jnp.exp(x - lse_BC[..., None])
    dx = glp_BC[..., None] * (_target_hit(tg_BC, x.shape[-1]).astype(jnp.float32) - p)
    if entropy:
      dx = dx - gent_BC[..., None] * p * (x - (lse_BC - ent_BC)[..., None])
    dlogits = (dx * inv_temp).astype(w_DV.dtype)
    dh = jnp.einsum("BCV,DV->BCD", dlogits, w_DV, preferred_element_type=jnp.float32).astype(h_BCD.dtype)
    dw_DV = dw_DV + jnp.einsum("BCD,BCV->DV", h_BCD, dlogits, preferred_element_type=jnp.float32)
    return dw_DV, dh

  dw0 = jnp.zeros(w_DV.shape, jnp.float32)
  dw, dh = jax.lax.scan(body, dw0, (h_NBCD, tg_NBC, ent_NBC, lse_NBC, g_lp, g_ent))
  return dh, dw.astype(w_DV.dtype), None


_scan_logprobs.defvjp(_scan_logprobs_fwd, _scan_logprobs_bwd)


def chunked_logprobs(h_BTD: Array, w_DV: Array, targets_BT: Array, temperature: float = 1.0, *, chunk: int = 0,
                     entropy: bool = False) -> tuple[Array, Array | None]:
  """(log p(targets), entropy or None), both [B, T] float32, from hidden states and the LM head.

  logits = h @ w (float32 accumulation) / temperature; log p = logits[target] - logsumexp(logits).
  The sequence is cut into chunks of `logits_chunk_size(chunk, ...)` positions (the last one padded)
  run by `lax.scan`, with a custom backward pass that recomputes each chunk's logits: memory holds
  one chunk's [B, C, V] logits, never [B, T, V], and the weight gradient is accumulated over chunks
  in float32 (not in the weight's dtype, which would round it at every chunk). With one chunk it is
  the plain computation, differentiated by JAX.
  """
  b, t, _ = h_BTD.shape
  v = w_DV.shape[1]
  inv_temp = 1.0 / float(temperature)
  c = logits_chunk_size(chunk, b, t, v)
  if c >= t:
    lp, ent, _ = _logprob_chunk(h_BTD, w_DV, targets_BT, inv_temp, entropy)
    return lp, (ent if entropy else None)
  n = -(-t // c)
  pad = n * c - t
  h = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0))) if pad else h_BTD
  tg = jnp.pad(targets_BT, ((0, 0), (0, pad))) if pad else targets_BT
  h_NBCD = jnp.swapaxes(h.reshape(b, n, c, h.shape[-1]), 0, 1)
  tg_NBC = jnp.swapaxes(tg.reshape(b, n, c), 0, 1)
  lp_NBC, ent_NBC = _scan_logprobs(h_NBCD, w_DV, tg_NBC, inv_temp, bool(entropy))

  def unchunk(x_NBC):
    return jnp.swapaxes(x_NBC, 0, 1).reshape(b, n * c)[:, :t]

  return unchunk(lp_NBC), (unchunk(ent_NBC) if entropy else None)


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
  """LLaMA-family decoder with a language-model head ("lm") or a scalar head ("scalar").

  `model(tokens_BT, positions_BT=None, attention_mask_BT=None)` returns logits [B, T, V] (lm)
  or values [B, T] (scalar) in float32. `model.forward(...)` also takes and returns a KVCache.
  """

  def __init__(self, cfg: ModelConfig, *, head: str = "lm", rngs: nnx.Rngs, init_std: float = 0.02):
    if head not in ("lm", "scalar"):
      raise ValueError(f"head={head!r}: expected 'lm' or 'scalar'")
    self.cfg = cfg
    self.head = head
    pd = jnp.dtype(cfg.param_dtype)
    self.embed = _param(rngs, _normal(init_std), (cfg.vocab_size, cfg.d_model), pd, ("vocab", "embed"))
    self.layers = Layers(cfg, rngs=rngs, init_std=init_std)
    self.final_norm = _param(rngs, _ones, (cfg.d_model,), pd, ("embed",))
    if head == "lm" and not cfg.tie_embeddings:
      self.lm_head = _param(rngs, _normal(init_std), (cfg.d_model, cfg.vocab_size), pd, ("embed", "vocab"))
    if head == "scalar":
      self.score = _param(rngs, _normal(init_std), (cfg.d_model,), pd, ("embed",))

  # -- forward -------------------------------------------------------------------------------

  def hidden(self, tokens_BT: Array, positions_BT: Array | None = None, attention_mask_BT: Array | None = None,
             cache: KVCache | None = None, *, train: bool = False, scan_layers: bool = True,
             layer_params: list[dict[str, Array]] | None = None,
             kv_len: int | None = None) -> tuple[Array, KVCache | None]:
    """Final-norm hidden states [B, T, D] and the updated cache.

    tokens_BT: int token ids. positions_BT: RoPE positions (default: cumsum of the mask - 1).
    attention_mask_BT: 1/True for real tokens, 0/False for padding (default: all real).
    cache: when given, the T tokens are written at slots [cache.index, cache.index + T) and attend
      to every earlier valid slot; the returned cache has index advanced by T.
    train: apply the configured rematerialisation.
    scan_layers: with a cache, False unrolls the layer loop (static weight slices; used by the
      decode loop of generation, where a scanned layer loop may copy each layer's weights out of
      the stack every step). Same math either way.
    layer_params: with a per-layer cache, each layer's parameters as its own arrays (see
      `layer_arrays`; default: sliced from the stacked parameters here). The layer loop is
      unrolled over them, so a decode loop that gets them from outside never slices weights.
    kv_len: with a per-layer cache and one token (a decode step): attention reads only the first
      kv_len slots (static), which must hold every slot before `cache.index`.
    """
    cfg = self.cfg
    b, t = tokens_BT.shape
    mask_BT = jnp.ones((b, t), bool) if attention_mask_BT is None else attention_mask_BT.astype(bool)
    if positions_BT is None:
      positions_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0)
      if cache is not None:  # Continue from the real tokens already in the cache.
        positions_BT = positions_BT + jnp.sum(cache.valid, axis=1, keepdims=True)
    dt = jnp.dtype(cfg.dtype)
    x_BTD = jnp.take(self.embed.get_value(), tokens_BT, axis=0).astype(dt)
    x_BTD = constrain(x_BTD, ("batch", "seq", "embed"))
    inv_freq = rope_inv_freq(cfg)
    if cache is None:
      index = jnp.zeros((), jnp.int32)
      valid_BS = mask_BT
    else:
      index = cache.index
      valid_BS = jax.lax.dynamic_update_slice_in_dim(cache.valid, mask_BT, index, axis=1)
    q_slot_BT = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t))
    mask_BTS = slot_mask(q_slot_BT, valid_BS)

    params = self.layers.arrays()
    new_cache = None
    if layer_params is not None and (cache is None or not cache.per_layer):
      raise ValueError("Transformer.hidden: layer_params needs a per-layer KVCache (KVCache.zeros(per_layer=True))")
    if cache is not None and cache.per_layer:
      lps = layer_params if layer_params is not None else layer_arrays(params, cfg.n_layers)
      if len(lps) != cfg.n_layers or len(cache.k) != cfg.n_layers or len(cache.v) != cfg.n_layers:
        raise ValueError(f"Transformer.hidden: {cfg.n_layers} layers, but {len(lps)} layer_params and "
                         f"{len(cache.k)}/{len(cache.v)} cache k/v buffers")
      if kv_len is not None and not 0 < kv_len <= cache.valid.shape[1]:
        raise ValueError(f"Transformer.hidden: kv_len={kv_len} outside the cache's 1..{cache.valid.shape[1]} slots")
      old_mask_BS = None
      if t == 1:  # Decode: earlier slots the token sees (its own slot joins in decode_attention).
        s_idx = jnp.arange(cache.valid.shape[1], dtype=jnp.int32)[None, :]
        old_mask_BS = cache.valid & (s_idx < index)
      ks, vs = [], []
      for i in range(cfg.n_layers):
        x_BTD, (k_i, v_i) = _layer(cfg, inv_freq, x_BTD, lps[i], positions_BT, mask_BTS,
                                   (cache.k[i], cache.v[i], None), index, old_mask_BS, kv_len)
        ks.append(k_i)
        vs.append(v_i)
      new_cache = KVCache(tuple(ks), tuple(vs), valid_BS, index + t)
    elif cache is None:
      def body(x, p):
        return _layer(cfg, inv_freq, x, p, positions_BT, mask_BTS, None, index)[0], None

      if train and cfg.remat != "none":
        # prevent_cse=False is safe only under scan. Unrolled, XLA's CSE on GPU merged each layer's
        # backward recomputation with its forward, keeping every layer's residuals: a 7B train step on
        # 4x H200 (16 rows x 1152 tokens per GPU) peaked at 87.6 GiB with "full" remat and 40.8 GiB with
        # the barriers, 3% slower (bench/results/remat-h200x4.json).
        body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=cfg.unroll_layers)
      if cfg.unroll_layers:  # Each layer's residuals are their own buffers (no stacking copies).
        for p in layer_arrays(params, cfg.n_layers):
          x_BTD, _ = body(x_BTD, p)
      else:
        x_BTD, _ = jax.lax.scan(body, x_BTD, params)
    else:
      # The stacked cache rides in the carry and is updated in place (a scan over it as xs/ys
      # would rewrite every layer's whole cache each step).
      def body_kv(carry, xs):
        x, k_all, v_all = carry
        p, layer = xs
        x, (k_all, v_all) = _layer(cfg, inv_freq, x, p, positions_BT, mask_BTS, (k_all, v_all, layer), index)
        return (x, k_all, v_all), None

      carry = (x_BTD, cache.k, cache.v)
      if scan_layers:
        carry, _ = jax.lax.scan(body_kv, carry, (params, jnp.arange(cfg.n_layers, dtype=jnp.int32)))
      else:  # Unrolled: static per-layer weight slices (no per-step weight copies inside a decode loop).
        for i in range(cfg.n_layers):
          carry, _ = body_kv(carry, (jax.tree.map(lambda a, i=i: a[i], params), i))
      x_BTD, k_all, v_all = carry
      new_cache = KVCache(k_all, v_all, valid_BS, index + t)
    h_BTD = rms_norm(x_BTD, self.final_norm.get_value(), cfg.rms_eps)
    return h_BTD, new_cache

  def lm_head_weight(self, dtype) -> Array:
    """[D, V] LM-head matrix (the transposed embedding when tied) in `dtype`."""
    w_DV = self.embed.get_value().T if self.cfg.tie_embeddings else self.lm_head.get_value()
    return w_DV.astype(dtype)

  def project(self, h_BTD: Array) -> Array:
    """Head on top of hidden states: logits [B, T, V] or values [B, T], float32.

    The matmul accumulates and returns float32 (`preferred_element_type`), whatever the compute
    dtype: logits are never rounded to bf16 before a softmax.
    """
    if self.head == "scalar":
      return jnp.einsum("BTD,D->BT", h_BTD, self.score.get_value().astype(h_BTD.dtype),
                        preferred_element_type=jnp.float32)
    logits = jnp.einsum("BTD,DV->BTV", h_BTD, self.lm_head_weight(h_BTD.dtype), preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "seq", "vocab"))

  def token_logprobs(self, tokens_BT: Array, attention_mask_BT: Array | None = None, *, temperature: float = 1.0,
                     train: bool = False, entropy: bool = False) -> Array | tuple[Array, Array]:
    """Shifted per-token log-probs [B, T] float32 of `tokens_BT` (and the entropy [B, T] with `entropy`).

    `logp[:, t] = log softmax(logits[:, t] / temperature)[tokens[:, t + 1]]` for t < T - 1; the last
    column is 0 (the `inference` / `generation` alignment). `entropy[:, t]` is the entropy of that
    same distribution (last column 0). The same numbers as `log_softmax(project(hidden))`, computed
    over chunks of `cfg.logits_chunk` positions (`chunked_logprobs`) so the [B, T, V] logits are
    never whole in memory.
    """
    if self.head != "lm":
      raise ValueError("Transformer.token_logprobs needs an lm-head model (this one has a scalar head)")
    h_BTD, _ = self.hidden(tokens_BT, attention_mask_BT=attention_mask_BT, train=train)
    targets_BT = jnp.pad(tokens_BT[:, 1:].astype(jnp.int32), ((0, 0), (0, 1)))
    lp, ent = chunked_logprobs(h_BTD, self.lm_head_weight(h_BTD.dtype), targets_BT, temperature,
                               chunk=self.cfg.logits_chunk, entropy=entropy)
    last = jnp.arange(tokens_BT.shape[1]) < tokens_BT.shape[1] - 1
    lp = jnp.where(last, lp, 0.0)
    return (lp, jnp.where(last, ent, 0.0)) if entropy else lp

  def forward(self, tokens_BT, positions_BT=None, attention_mask_BT=None, cache=None, *, train=False,
              scan_layers=True, layer_params=None, kv_len=None):
    """(logits or values, updated cache)."""
    h, cache = self.hidden(tokens_BT, positions_BT, attention_mask_BT, cache, train=train, scan_layers=scan_layers,
                           layer_params=layer_params, kv_len=kv_len)
    return self.project(h), cache

  def __call__(self, tokens_BT, positions_BT=None, attention_mask_BT=None, *, train=False):
    return self.forward(tokens_BT, positions_BT, attention_mask_BT, train=train)[0]


# ---------------------------------------------------------------------------------------------
# Creation, sharded from birth.


def abstract_model(cfg: ModelConfig, *, head: str = "lm") -> Transformer:
  """The model with `jax.ShapeDtypeStruct` parameters (nothing allocated)."""
  return nnx.eval_shape(lambda: Transformer(cfg, head=head, rngs=nnx.Rngs(0)))


def create_model(cfg: ModelConfig, layout=None, *, seed: int = 0, head: str = "lm") -> Transformer:
  """A randomly initialised model whose parameters are created directly in `layout`'s shardings.

  eval_shape -> shardings from the logical-axis rules -> jit(init, out_shardings=...): no parameter
  ever exists on a single device first. layout=None means device 0 alone.
  """
  from sharding import Layout, shardings_for

  layout = layout if layout is not None else Layout.on(0)
  graphdef, abstract_state = nnx.split(abstract_model(cfg, head=head))
  shardings = shardings_for(abstract_state, layout)

  @functools.partial(jax.jit, out_shardings=shardings)
  def init():
    return nnx.state(Transformer(cfg, head=head, rngs=nnx.Rngs(seed)))

  return nnx.merge(graphdef, init())


def param_shardings(model: Transformer, layout) -> Any:
  """NamedShardings of `model`'s state (an nnx.State) under `layout`."""
  from sharding import shardings_for

  return shardings_for(nnx.state(model), layout)

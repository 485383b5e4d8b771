"""Shared RLHF math: masked reductions, whitening, KL estimators, entropy, KL controllers,
reward shaping.

Shape legend: B batch (sequences), T response tokens, V vocab, G group size.
Every per-token array is [B, T] and aligned to *response tokens*; `mask[b, t]` is 1.0 on the
response tokens of row b (contiguous from its first one) and 0.0 elsewhere. Masked reductions
ignore mask == 0 entries exactly (a NaN or inf there does not leak) and return 0, never NaN,
where nothing is selected.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from real_jax.algorithms.registry import register_kl

Array = jax.Array

LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


# ------------------------------------------------------------------ shape checks


def check_shapes(fn_name: str, **arrays) -> None:
  """Trace-time check that every named array has the shape of the first one (static shapes only)."""
  items = [(k, v) for k, v in arrays.items() if v is not None]
  if not items:
    return
  ref_name, ref = items[0]
  for name, a in items[1:]:
    if jnp.shape(a) != jnp.shape(ref):
      raise ValueError(
        f"{fn_name}: {name} has shape {jnp.shape(a)}, expected {jnp.shape(ref)} (the shape of {ref_name})"
      )


def check_rank(fn_name: str, rank: int, **arrays) -> None:
  for name, a in arrays.items():
    if a is not None and jnp.ndim(a) != rank:
      raise ValueError(f"{fn_name}: {name} must have rank {rank}, got shape {jnp.shape(a)}")


# ------------------------------------------------------------------ masked reductions


def _sel(mask: Array) -> Array:
  return jnp.asarray(mask) != 0


def masked_sum(x: Array, mask: Array, axis=None) -> Array:
  """sum_i x_i * m_i over `axis` (all axes if None); entries with m_i == 0 are dropped exactly."""
  x = jnp.asarray(x, jnp.float32)
  m = jnp.asarray(mask, jnp.float32)
  return jnp.sum(jnp.where(_sel(m), x * m, 0.0), axis=axis)


def masked_mean(x: Array, mask: Array, axis=None) -> Array:
  """sum_i x_i m_i / sum_i m_i over `axis`; 0 where sum_i m_i == 0 (a fully masked row), never NaN."""
  m = jnp.asarray(mask, jnp.float32)
  num = masked_sum(x, m, axis=axis)
  den = jnp.sum(m, axis=axis)
  return jnp.where(den != 0, num / jnp.where(den != 0, den, 1.0), 0.0)


def masked_var(x: Array, mask: Array, axis=None, unbiased: bool = False) -> Array:
  """Masked variance: sum m (x - mu)^2 / N, or / (N - 1) with `unbiased` (N = sum m); 0 if N (- 1) <= 0."""
  m = jnp.asarray(mask, jnp.float32)
  mu = masked_mean(x, m, axis=axis)
  mu_b = mu if axis is None else jnp.expand_dims(mu, axis)
  sq = masked_sum(jnp.square(jnp.asarray(x, jnp.float32) - mu_b), m, axis=axis)
  n = jnp.sum(m, axis=axis) - (1.0 if unbiased else 0.0)
  return jnp.where(n > 0, sq / jnp.where(n > 0, n, 1.0), 0.0)


def masked_whiten(
  x: Array, mask: Array, *, shift_mean: bool = True, unbiased: bool = False, eps: float = 1e-8
) -> Array:
  """Whiten over all masked entries: (x - mu) / sqrt(var + eps), plus mu back if not `shift_mean`.

  mu and var are the masked mean and (population, or Bessel-corrected with `unbiased`) variance
  over every entry with mask != 0 (the whole batch, not per row). Masked-out entries come back 0.
  """
  x = jnp.asarray(x, jnp.float32)
  mu = masked_mean(x, mask)
  var = masked_var(x, mask, unbiased=unbiased)
  w = (x - mu) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    w = w + mu
  return jnp.where(_sel(mask), w, 0.0)


def aggregate_loss(per_token: Array, mask: Array, mode: str = "token_mean") -> Array:
  """Reduce a [B, T] per-token loss to a scalar.

  token_mean:          sum_{b,t} m l / sum_{b,t} m               (every token weighs the same)
  seq_mean_token_mean: mean over non-empty rows b of (sum_t m l / sum_t m)   (every sequence weighs the same)
  seq_mean_token_sum:  mean over non-empty rows b of  sum_t m l
  Rows with no response token are left out of the mean over rows; 0 if every row is empty.
  """
  if mode == "token_mean":
    return masked_mean(per_token, mask)
  row_has = (jnp.sum(jnp.asarray(mask, jnp.float32) != 0, axis=-1) > 0).astype(jnp.float32)
  if mode == "seq_mean_token_mean":
    per_row = masked_mean(per_token, mask, axis=-1)
  elif mode == "seq_mean_token_sum":
    per_row = masked_sum(per_token, mask, axis=-1)
  else:
    raise ValueError(f"unknown loss aggregation {mode!r}; known: {', '.join(LOSS_AGGREGATIONS)}")
  return masked_mean(per_row, row_has)


def aggregation_weight(mask: Array, mode: str = "token_mean") -> Array:
  """How much a batch counts when several are averaged into one `aggregate_loss` over their union.

  token_mean: sum of mask (tokens); seq_mean_*: number of non-empty rows. With w_i the weight of
  micro-batch i and L_i its aggregate loss, sum_i w_i L_i / sum_i w_i equals the aggregate loss of
  the whole batch, so gradient accumulation weighted this way gives the same update for any split.
  """
  if mode not in LOSS_AGGREGATIONS:
    raise ValueError(f"unknown loss aggregation {mode!r}; known: {', '.join(LOSS_AGGREGATIONS)}")
  m = jnp.asarray(mask, jnp.float32) != 0
  if mode == "token_mean":
    return jnp.sum(m).astype(jnp.float32)
  return jnp.sum(jnp.any(m, axis=-1)).astype(jnp.float32)


def sequence_logprobs(logprobs: Array, mask: Array) -> Array:
  """log pi(y | x) = sum_t m_t logprobs_t per row: [B, T] -> [B]."""
  return masked_sum(logprobs, mask, axis=-1)


def last_token_onehot(mask: Array) -> Array:
  """[B, T] one-hot at the last position with mask != 0 in each row (all zeros for an empty row)."""
  sel = _sel(mask)
  t = sel.shape[-1]
  last = t - 1 - jnp.argmax(sel[..., ::-1], axis=-1)
  onehot = jnp.arange(t) == last[..., None]
  return (onehot & jnp.any(sel, axis=-1, keepdims=True)).astype(jnp.float32)


def last_token_value(values: Array, mask: Array) -> Array:
  """values[b, last response token of b] -> [B] (0 for an empty row); e.g. a reward model's score."""
  return jnp.sum(jnp.where(last_token_onehot(mask) != 0, jnp.asarray(values, jnp.float32), 0.0), axis=-1)


# ------------------------------------------------------------------ KL estimators
# Samples y ~ pi (the policy that generated them). With r = ref(y) / pi(y) = exp(ref_logp - logp):
#   KL(pi || ref) = E_pi[log pi/ref] = E_pi[-log r].
# Schulman, "Approximating KL divergence" (2020).


@register_kl("k1")
def kl_k1(logprobs: Array, ref_logprobs: Array) -> Array:
  """k1 = -log r = logp - ref_logp (per token).

  Unbiased for KL(pi || ref) on samples from pi; high variance and can be negative per token.
  """
  return jnp.asarray(logprobs, jnp.float32) - jnp.asarray(ref_logprobs, jnp.float32)


@register_kl("k2")
def kl_k2(logprobs: Array, ref_logprobs: Array) -> Array:
  """k2 = 0.5 (log r)^2 = 0.5 (logp - ref_logp)^2 (per token).

  Always >= 0, low variance, biased (exact to second order in log r). Its gradient in logp equals
  the gradient of KL(pi || ref) in expectation, which is why it is a good KL *loss*.
  """
  return 0.5 * jnp.square(kl_k1(logprobs, ref_logprobs))


@register_kl("k3")
def kl_k3(logprobs: Array, ref_logprobs: Array) -> Array:
  """k3 = r - 1 - log r with r = exp(ref_logp - logp) (per token).

  Unbiased for KL(pi || ref) on samples from pi (E_pi[r] = 1), always >= 0 (since log r <= r - 1),
  lower variance than k1. The GRPO KL term.
  """
  log_r = jnp.asarray(ref_logprobs, jnp.float32) - jnp.asarray(logprobs, jnp.float32)
  return jnp.expm1(log_r) - log_r


# ------------------------------------------------------------------ entropy


def entropy_from_logits(logits_BTV: Array) -> Array:
  """Per-token entropy H_t = -sum_v p_v log p_v = logsumexp(l) - sum_v softmax(l)_v l_v: [B, T, V] -> [B, T]."""
  logits = jnp.asarray(logits_BTV, jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  p = jax.nn.softmax(logits, axis=-1)
  return lse - jnp.sum(p * logits, axis=-1)


def masked_entropy(logits_BTV: Array, mask: Array, mode: str = "token_mean") -> Array:
  """Entropy of the policy over response tokens, reduced with `aggregate_loss(., mask, mode)`."""
  return aggregate_loss(entropy_from_logits(logits_BTV), mask, mode)


# ------------------------------------------------------------------ KL coefficient controllers


@dataclasses.dataclass(frozen=True)
class FixedKLController:
  """kl_coef stays at `init_kl_coef`. Same pure interface as AdaptiveKLController."""

  init_kl_coef: float

  def __post_init__(self):
    if not self.init_kl_coef >= 0:
      raise ValueError(f"FixedKLController.init_kl_coef must be >= 0, got {self.init_kl_coef!r}")

  def init(self) -> Array:
    return jnp.float32(self.init_kl_coef)

  def update(self, kl_coef: Array, current_kl: Array, n_steps) -> Array:
    del current_kl, n_steps
    return jnp.asarray(kl_coef, jnp.float32)


@dataclasses.dataclass(frozen=True)
class AdaptiveKLController:
  """Proportional KL controller of Ziegler et al. 2019 ("Fine-Tuning LMs from Human Preferences").

  e = clip(current_kl / target - 1, -0.2, 0.2)
  kl_coef <- kl_coef * (1 + e * n_steps / horizon)
  KL above target raises the coefficient, below lowers it. Pure: the state is the scalar kl_coef,
  `update` returns the new one (jittable; the controller itself is a static, hashable value).
  """

  init_kl_coef: float
  target: float
  horizon: float

  def __post_init__(self):
    for name in ("init_kl_coef", "target", "horizon"):
      v = getattr(self, name)
      if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
        raise ValueError(f"AdaptiveKLController.{name} must be a finite number > 0, got {v!r}")

  def init(self) -> Array:
    return jnp.float32(self.init_kl_coef)

  def update(self, kl_coef: Array, current_kl: Array, n_steps) -> Array:
    err = jnp.clip(jnp.asarray(current_kl, jnp.float32) / self.target - 1.0, -0.2, 0.2)
    return jnp.asarray(kl_coef, jnp.float32) * (1.0 + err * jnp.asarray(n_steps, jnp.float32) / self.horizon)


# ------------------------------------------------------------------ reward shaping


def scale_and_clip_rewards(scores: Array, *, scale: float = 1.0, bias: float = 0.0, clip: float | None = None) -> Array:
  """s' = (s + bias) * scale, then clipped to [-clip, clip] when `clip` is set."""
  s = (jnp.asarray(scores, jnp.float32) + bias) * scale
  return s if clip is None else jnp.clip(s, -clip, clip)


def apply_no_eos_penalty(scores: Array, no_eos: Array, penalty: float) -> Array:
  """s' = s - penalty * no_eos: a response cut at the length limit without EOS loses `penalty`."""
  return jnp.asarray(scores, jnp.float32) - penalty * jnp.asarray(no_eos, jnp.float32)


# ------------------------------------------------------------------ group helpers


def group_view(rewards: Array, group_size: int, fn_name: str) -> Array:
  """[B] -> [B // G, G], group-major (rows b = g * G + i belong to group g); checks divisibility."""
  rewards = jnp.asarray(rewards, jnp.float32)
  check_rank(fn_name, 1, rewards=rewards)
  b = rewards.shape[0]
  if group_size < 1 or b % group_size:
    raise ValueError(f"{fn_name}: batch {b} is not a multiple of group_size={group_size}")
  return rewards.reshape(b // group_size, group_size)


# ------------------------------------------------------------------ config validation helpers


def require(cls_name: str, field: str, value, ok: bool, what: str) -> None:
  if not ok:
    raise ValueError(f"{cls_name}.{field} must be {what}, got {value!r}")


def is_num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_pos_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def none_or_gt(v, lo: float) -> bool:
  return v is None or (is_num(v) and v > lo)


def require_choice(cls_name: str, field: str, value, choices) -> None:
  require(cls_name, field, value, value in tuple(choices), f"one of {tuple(choices)}")

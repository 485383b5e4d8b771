"""PPO for RLHF (Ouyang et al. 2022; Ziegler et al. 2019): token rewards, GAE, clipped policy and
value losses, KL in the reward or as a loss.

Shapes (see common.py): B sequences, T response tokens; every [B, T] array is aligned to response
tokens and `mask` is 1.0 on them. All functions are pure and jittable; hyperparameters are
keyword-only (bind them with functools.partial or pass a PPOConfig to the *_from_config helpers).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from real_jax.algorithms import common
from real_jax.algorithms.common import Array, aggregate_loss, masked_mean
from real_jax.algorithms.registry import KL_ESTIMATORS, get_kl, register_advantage, register_loss


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """PPO hyperparameters.

  Attributes:
    gamma, lam: GAE discount and lambda, in [0, 1].
    clip_eps: policy ratio clip: ratio kept in [1 - clip_eps, 1 + clip_eps_high].
    clip_eps_high: upper clip (DAPO "clip-higher"); None -> clip_eps.
    dual_clip: None or c > 1: for A < 0 the per-token loss is capped at -c A (Ye et al. 2020).
    value_clip_eps: None (no value clipping) or > 0: V kept within old_V +- value_clip_eps.
    kl_coef: initial coefficient of the KL penalty (>= 0).
    kl_in_reward: True -> per-token reward -kl_coef * KL (PPO-RLHF); False -> kl_coef * KL as a loss.
    kl_estimator: registered KL estimator name ("k1", "k2", "k3"); k1 is the usual in-reward choice.
    kl_target, kl_horizon: adaptive KL controller (None target -> fixed kl_coef).
    whiten_advantages: whiten advantages over the batch's response tokens.
    reward_scale, reward_bias, reward_clip: score -> clip((score + bias) * scale, +-reward_clip).
    no_eos_penalty: subtracted from the (scaled, clipped) score of a response without EOS (>= 0).
    entropy_coef: weight of the entropy bonus (>= 0); loss -= entropy_coef * mean entropy.
    loss_agg: "token_mean", "seq_mean_token_mean" or "seq_mean_token_sum".
    ppo_epochs: passes over each batch; mini_batches: optimizer steps per pass.
  """

  gamma: float = 1.0
  lam: float = 0.95
  clip_eps: float = 0.2
  clip_eps_high: float | None = None
  dual_clip: float | None = None
  value_clip_eps: float | None = 0.2
  kl_coef: float = 0.05
  kl_in_reward: bool = True
  kl_estimator: str = "k1"
  kl_target: float | None = None
  kl_horizon: float = 10000.0
  whiten_advantages: bool = True
  reward_scale: float = 1.0
  reward_bias: float = 0.0
  reward_clip: float | None = None
  no_eos_penalty: float = 0.0
  entropy_coef: float = 0.0
  loss_agg: str = "token_mean"
  ppo_epochs: int = 1
  mini_batches: int = 1

  def __post_init__(self):
    r, n = common.require, common.is_num
    c = "PPOConfig"
    r(c, "gamma", self.gamma, n(self.gamma) and 0 <= self.gamma <= 1, "a number in [0, 1]")
    r(c, "lam", self.lam, n(self.lam) and 0 <= self.lam <= 1, "a number in [0, 1]")
    r(c, "clip_eps", self.clip_eps, n(self.clip_eps) and 0 < self.clip_eps < 1, "a number in (0, 1)")
    r(c, "clip_eps_high", self.clip_eps_high, common.none_or_gt(self.clip_eps_high, 0), "None or > 0")
    r(c, "dual_clip", self.dual_clip, common.none_or_gt(self.dual_clip, 1), "None or > 1")
    r(c, "value_clip_eps", self.value_clip_eps, common.none_or_gt(self.value_clip_eps, 0), "None or > 0")
    r(c, "kl_coef", self.kl_coef, n(self.kl_coef) and self.kl_coef >= 0, "a number >= 0")
    r(c, "kl_in_reward", self.kl_in_reward, isinstance(self.kl_in_reward, bool), "a bool")
    common.require_choice(c, "kl_estimator", self.kl_estimator, KL_ESTIMATORS.names())
    r(c, "kl_target", self.kl_target, common.none_or_gt(self.kl_target, 0), "None or > 0")
    r(c, "kl_horizon", self.kl_horizon, n(self.kl_horizon) and self.kl_horizon > 0, "a number > 0")
    r(c, "whiten_advantages", self.whiten_advantages, isinstance(self.whiten_advantages, bool), "a bool")
    r(c, "reward_scale", self.reward_scale, n(self.reward_scale) and self.reward_scale > 0, "a number > 0")
    r(c, "reward_bias", self.reward_bias, n(self.reward_bias), "a finite number")
    r(c, "reward_clip", self.reward_clip, common.none_or_gt(self.reward_clip, 0), "None or > 0")
    r(c, "no_eos_penalty", self.no_eos_penalty, n(self.no_eos_penalty) and self.no_eos_penalty >= 0, "a number >= 0")
    r(c, "entropy_coef", self.entropy_coef, n(self.entropy_coef) and self.entropy_coef >= 0, "a number >= 0")
    common.require_choice(c, "loss_agg", self.loss_agg, common.LOSS_AGGREGATIONS)
    r(c, "ppo_epochs", self.ppo_epochs, common.is_pos_int(self.ppo_epochs), "an int >= 1")
    r(c, "mini_batches", self.mini_batches, common.is_pos_int(self.mini_batches), "an int >= 1")
    if self.kl_target is not None and self.kl_coef == 0:
      raise ValueError("PPOConfig.kl_coef must be > 0 when kl_target is set (the adaptive controller scales it)")

  def kl_controller(self) -> common.FixedKLController | common.AdaptiveKLController:
    if self.kl_target is None:
      return common.FixedKLController(self.kl_coef)
    return common.AdaptiveKLController(self.kl_coef, self.kl_target, self.kl_horizon)


# ------------------------------------------------------------------ rewards and advantages


def compute_token_rewards(
  scores: Array,
  logprobs: Array,
  ref_logprobs: Array,
  mask: Array,
  no_eos: Array,
  kl_coef,
  *,
  kl_in_reward: bool = True,
  kl_estimator: str = "k1",
  reward_scale: float = 1.0,
  reward_bias: float = 0.0,
  reward_clip: float | None = None,
  no_eos_penalty: float = 0.0,
) -> tuple[Array, Array]:
  """Per-token PPO rewards and the per-token KL.

  s_b   = clip((score_b + bias) * scale, -reward_clip, reward_clip) - no_eos_penalty * no_eos_b
  kl_bt = KL_est(logprobs_bt, ref_logprobs_bt) * m_bt          (k1 = logp - ref_logp by default)
  r_bt  = -kl_coef * kl_bt * [kl_in_reward] + s_b * [t == last response token of b]
  `logprobs` are those of the rollout (behaviour) policy. `kl_coef` may be a traced scalar (adaptive
  controller). A row with no response token gets no reward. Returns (r [B, T], kl [B, T]).
  """
  common.check_shapes("compute_token_rewards", logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
  common.check_rank("compute_token_rewards", 2, logprobs=logprobs)
  common.check_rank("compute_token_rewards", 1, scores=scores, no_eos=no_eos)
  s = common.scale_and_clip_rewards(scores, scale=reward_scale, bias=reward_bias, clip=reward_clip)
  s = common.apply_no_eos_penalty(s, no_eos, no_eos_penalty)
  sel = jnp.asarray(mask) != 0
  kl = jnp.where(sel, get_kl(kl_estimator)(logprobs, ref_logprobs), 0.0)
  r = s[:, None] * common.last_token_onehot(mask)
  if kl_in_reward:
    r = r - jnp.asarray(kl_coef, jnp.float32) * kl
  return r, kl


def discounted_returns(token_rewards: Array, mask: Array, *, gamma: float = 1.0) -> Array:
  """Reward-to-go G_t = r_t + gamma * m_{t+1} * G_{t+1} over the response (G = 0 off the mask)."""
  sel = (jnp.asarray(mask) != 0).astype(jnp.float32)
  r = jnp.where(sel != 0, jnp.asarray(token_rewards, jnp.float32), 0.0)
  next_m = jnp.pad(sel[:, 1:], ((0, 0), (0, 1)))

  def step(carry, x):
    r_t, nm_t = x
    g = r_t + gamma * nm_t * carry
    return g, g

  _, g = jax.lax.scan(step, jnp.zeros(r.shape[0], jnp.float32), (r.T, next_m.T), reverse=True)
  return g.T * sel


@register_advantage("gae")
def gae_advantages(
  token_rewards: Array, values: Array, mask: Array, *, gamma: float, lam: float
) -> tuple[Array, Array]:
  """Generalised advantage estimation (Schulman et al. 2016) over the masked response.

  delta_t = r_t + gamma * V_{t+1} - V_t
  A_t     = delta_t + gamma * lam * A_{t+1}
  R_t     = A_t + V_t          (returns, the critic's target)
  computed by a reverse `lax.scan` over T. Bootstrap: V_{t+1} = 0 and A_{t+1} = 0 past the last
  response token, i.e. the last token is terminal, also when the response was cut at the length
  limit (no_eos); penalise truncation through the reward instead. Masked positions come back 0.
  Returns (advantages [B, T], returns [B, T]).
  """
  common.check_shapes("gae_advantages", token_rewards=token_rewards, values=values, mask=mask)
  common.check_rank("gae_advantages", 2, token_rewards=token_rewards)
  sel = (jnp.asarray(mask) != 0).astype(jnp.float32)
  r = jnp.where(sel != 0, jnp.asarray(token_rewards, jnp.float32), 0.0)
  v = jnp.where(sel != 0, jnp.asarray(values, jnp.float32), 0.0)
  next_v = jnp.pad(v[:, 1:], ((0, 0), (0, 1)))
  next_m = jnp.pad(sel[:, 1:], ((0, 0), (0, 1)))
  delta = r + gamma * next_v * next_m - v

  def step(carry, x):
    d_t, nm_t = x
    a = d_t + gamma * lam * nm_t * carry
    return a, a

  _, adv = jax.lax.scan(step, jnp.zeros(r.shape[0], jnp.float32), (delta.T, next_m.T), reverse=True)
  adv = adv.T * sel
  return adv, (adv + v) * sel


def ppo_advantages(
  scores: Array,
  logprobs: Array,
  ref_logprobs: Array,
  values: Array,
  mask: Array,
  no_eos: Array,
  kl_coef,
  config: PPOConfig,
) -> dict[str, Array]:
  """The whole PPO advantage step: token rewards -> GAE -> optional whitening.

  Returns a dict: advantages, returns (un-whitened A + V), token_rewards, kl (per token),
  and mean_kl (token mean of kl, the adaptive controller's input). `config` is static.
  """
  r, kl = compute_token_rewards(
    scores, logprobs, ref_logprobs, mask, no_eos, kl_coef,
    kl_in_reward=config.kl_in_reward, kl_estimator=config.kl_estimator, reward_scale=config.reward_scale,
    reward_bias=config.reward_bias, reward_clip=config.reward_clip, no_eos_penalty=config.no_eos_penalty,
  )  # fmt: skip
  adv, ret = gae_advantages(r, values, mask, gamma=config.gamma, lam=config.lam)
  if config.whiten_advantages:
    adv = common.masked_whiten(adv, mask)
  return {"advantages": adv, "returns": ret, "token_rewards": r, "kl": kl, "mean_kl": masked_mean(kl, mask)}


# ------------------------------------------------------------------ losses


@register_loss("ppo_clip")
def clipped_policy_loss(
  logprobs: Array,
  old_logprobs: Array,
  advantages: Array,
  mask: Array,
  *,
  clip_eps: float,
  clip_eps_high: float | None = None,
  dual_clip: float | None = None,
  loss_agg: str = "token_mean",
) -> tuple[Array, dict[str, Array]]:
  """PPO clipped surrogate (Schulman et al. 2017), optionally dual-clipped (Ye et al. 2020).

  ratio_t = exp(logp_t - old_logp_t)
  l_t     = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip_eps, 1 + clip_eps_high))
  dual:     l_t = min(l_t, -c * A_t)  where A_t < 0            (c = dual_clip > 1)
  loss    = aggregate(l, mask)         (token mean by default)
  Stats: clip_frac = mean[-A clip(ratio) > -A ratio] (the clipped term is active),
  dual_clip_frac, approx_kl = mean(k3 with r = ratio) ~ KL(old || new), ratio_mean; all token means.
  """
  common.check_shapes(
    "clipped_policy_loss", logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask
  )
  hi = clip_eps if clip_eps_high is None else clip_eps_high
  a = jnp.asarray(advantages, jnp.float32)
  log_ratio = jnp.asarray(logprobs, jnp.float32) - jnp.asarray(old_logprobs, jnp.float32)
  ratio = jnp.exp(log_ratio)
  pg1 = -a * ratio
  pg2 = -a * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + hi)
  per_tok = jnp.maximum(pg1, pg2)
  stats = {"clip_frac": masked_mean((pg2 > pg1).astype(jnp.float32), mask)}
  if dual_clip is not None:
    cap = -dual_clip * a
    dual_active = (a < 0) & (per_tok > cap)
    per_tok = jnp.where(a < 0, jnp.minimum(per_tok, cap), per_tok)
    stats["dual_clip_frac"] = masked_mean(dual_active.astype(jnp.float32), mask)
  stats["approx_kl"] = masked_mean(jnp.expm1(log_ratio) - log_ratio, mask)
  stats["ratio_mean"] = masked_mean(ratio, mask)
  loss = aggregate_loss(per_tok, mask, loss_agg)
  stats["pg_loss"] = loss
  return loss, stats


@register_loss("ppo_value")
def clipped_value_loss(
  values: Array,
  old_values: Array,
  returns: Array,
  mask: Array,
  *,
  value_clip_eps: float | None = None,
  loss_agg: str = "token_mean",
) -> tuple[Array, dict[str, Array]]:
  """PPO value loss with optional clipping around the rollout-time values.

  V_clip_t = old_V_t + clip(V_t - old_V_t, -value_clip_eps, value_clip_eps)
  l_t      = 0.5 * max((V_t - R_t)^2, (V_clip_t - R_t)^2)     (0.5 (V - R)^2 without clipping)
  loss     = aggregate(l, mask). Stats: vf_clip_frac (clipped term strictly larger), value_error.
  """
  common.check_shapes("clipped_value_loss", values=values, old_values=old_values, returns=returns, mask=mask)
  v = jnp.asarray(values, jnp.float32)
  ret = jnp.asarray(returns, jnp.float32)
  err1 = jnp.square(v - ret)
  stats = {}
  if value_clip_eps is None:
    per_tok = 0.5 * err1
    stats["vf_clip_frac"] = jnp.float32(0.0)
  else:
    old = jnp.asarray(old_values, jnp.float32)
    v_clip = old + jnp.clip(v - old, -value_clip_eps, value_clip_eps)
    err2 = jnp.square(v_clip - ret)
    per_tok = 0.5 * jnp.maximum(err1, err2)
    stats["vf_clip_frac"] = masked_mean((err2 > err1).astype(jnp.float32), mask)
  stats["value_error"] = masked_mean(err1, mask)
  loss = aggregate_loss(per_tok, mask, loss_agg)
  stats["vf_loss"] = loss
  return loss, stats


@register_loss("ppo_actor")
def ppo_actor_loss(
  logprobs: Array,
  old_logprobs: Array,
  ref_logprobs: Array | None,
  advantages: Array,
  mask: Array,
  kl_coef,
  *,
  config: PPOConfig,
  entropy: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
  """Actor objective: clipped policy loss - entropy_coef * H + [not kl_in_reward] kl_coef * KL.

  H  = aggregate(entropy, mask), `entropy` [B, T] per token (`Transformer.token_logprobs(..., entropy=True)`; or None).
  KL = aggregate(KL_est(logprobs, ref_logprobs), mask) with config.kl_estimator, as a loss
       (differentiated through logprobs); only when config.kl_in_reward is False.
  """
  loss, stats = clipped_policy_loss(
    logprobs, old_logprobs, advantages, mask, clip_eps=config.clip_eps, clip_eps_high=config.clip_eps_high,
    dual_clip=config.dual_clip, loss_agg=config.loss_agg,
  )  # fmt: skip
  if entropy is not None:
    common.check_shapes("ppo_actor_loss", logprobs=logprobs, entropy=entropy)
    ent = aggregate_loss(entropy, mask, config.loss_agg)
    stats["entropy"] = ent
    loss = loss - config.entropy_coef * ent
  if not config.kl_in_reward:
    if ref_logprobs is None:
      raise ValueError("ppo_actor_loss: ref_logprobs is required when PPOConfig.kl_in_reward is False")
    common.check_shapes("ppo_actor_loss", logprobs=logprobs, ref_logprobs=ref_logprobs)
    kl = aggregate_loss(get_kl(config.kl_estimator)(logprobs, ref_logprobs), mask, config.loss_agg)
    stats["kl_loss"] = kl
    loss = loss + jnp.asarray(kl_coef, jnp.float32) * kl
  stats["loss"] = loss
  return loss, stats


@register_loss("ppo_critic")
def ppo_critic_loss(values: Array, old_values: Array, returns: Array, mask: Array, *, config: PPOConfig):
  """Critic objective: `clipped_value_loss` with config.value_clip_eps and config.loss_agg."""
  return clipped_value_loss(
    values, old_values, returns, mask, value_clip_eps=config.value_clip_eps, loss_agg=config.loss_agg
  )

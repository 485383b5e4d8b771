"""GRPO (Shao et al. 2024, DeepSeekMath): group-normalised outcome advantages, no critic.

The batch is group-major: B = prompts * G and rows g*G .. g*G + G - 1 are the G samples of prompt g.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from real_jax.algorithms import common
from real_jax.algorithms.common import Array, aggregate_loss
from real_jax.algorithms.ppo import clipped_policy_loss
from real_jax.algorithms.registry import KL_ESTIMATORS, get_kl, register_advantage, register_loss


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """GRPO hyperparameters.

  Attributes:
    group_size: G samples per prompt (>= 2).
    scale_by_std: divide by the group std (False: Dr. GRPO style, only subtract the mean).
    adv_eps: eps in (r - mean) / (std + eps).
    clip_eps, clip_eps_high, dual_clip: as in PPOConfig.
    beta: KL coefficient (>= 0) of the KL-to-reference loss (0 disables it).
    kl_estimator: registered KL estimator for the loss ("k3" in the paper).
    loss_agg: "seq_mean_token_mean" (the paper), "token_mean" (DAPO) or "seq_mean_token_sum".
    ppo_epochs, mini_batches: as in PPOConfig.
  """

  group_size: int = 8
  scale_by_std: bool = True
  adv_eps: float = 1e-6
  clip_eps: float = 0.2
  clip_eps_high: float | None = None
  dual_clip: float | None = None
  beta: float = 0.04
  kl_estimator: str = "k3"
  loss_agg: str = "seq_mean_token_mean"
  ppo_epochs: int = 1
  mini_batches: int = 1

  def __post_init__(self):
    r, n = common.require, common.is_num
    c = "GRPOConfig"
    r(c, "group_size", self.group_size, common.is_pos_int(self.group_size) and self.group_size >= 2, "an int >= 2")
    r(c, "scale_by_std", self.scale_by_std, isinstance(self.scale_by_std, bool), "a bool")
    r(c, "adv_eps", self.adv_eps, n(self.adv_eps) and self.adv_eps > 0, "a number > 0")
    r(c, "clip_eps", self.clip_eps, n(self.clip_eps) and 0 < self.clip_eps < 1, "a number in (0, 1)")
    r(c, "clip_eps_high", self.clip_eps_high, common.none_or_gt(self.clip_eps_high, 0), "None or > 0")
    r(c, "dual_clip", self.dual_clip, common.none_or_gt(self.dual_clip, 1), "None or > 1")
    r(c, "beta", self.beta, n(self.beta) and self.beta >= 0, "a number >= 0")
    common.require_choice(c, "kl_estimator", self.kl_estimator, KL_ESTIMATORS.names())
    common.require_choice(c, "loss_agg", self.loss_agg, common.LOSS_AGGREGATIONS)
    r(c, "ppo_epochs", self.ppo_epochs, common.is_pos_int(self.ppo_epochs), "an int >= 1")
    r(c, "mini_batches", self.mini_batches, common.is_pos_int(self.mini_batches), "an int >= 1")


@register_advantage("grpo")
def grpo_advantages(
  rewards: Array, mask: Array, *, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> Array:
  """Group-normalised advantages, broadcast over each response.

  For sample i of group g:  A_i = (r_i - mean_g) / (std_g + eps)   (or r_i - mean_g without scale_by_std)
  mean_g, std_g over the G rewards of the group; std is the population std (divide by G).
  A_bt = A_b * m_bt. rewards [B] with B a multiple of G (group-major); returns [B, T].
  A group of equal rewards gets advantage 0.
  """
  rg = common.group_view(rewards, group_size, "grpo_advantages")
  common.check_rank("grpo_advantages", 2, mask=mask)
  mu = jnp.mean(rg, axis=1, keepdims=True)
  a = rg - mu
  if scale_by_std:
    a = a / (jnp.std(rg, axis=1, keepdims=True) + eps)
  return a.reshape(-1)[:, None] * (jnp.asarray(mask) != 0)


@register_loss("grpo")
def grpo_loss(
  logprobs: Array,
  old_logprobs: Array,
  ref_logprobs: Array | None,
  advantages: Array,
  mask: Array,
  *,
  config: GRPOConfig,
) -> tuple[Array, dict[str, Array]]:
  """GRPO objective: clipped policy loss + beta * KL-to-reference as a loss.

  l_t  = max(-A ratio_t, -A clip(ratio_t, 1 - eps, 1 + eps_high)) + beta * k3_t
  k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1           (config.kl_estimator, "k3" default)
  loss = aggregate(l, mask, config.loss_agg): per-sequence token mean then mean over sequences
         ("seq_mean_token_mean", the paper) or a flat token mean ("token_mean").
  `advantages` [B, T] from grpo_advantages; ref_logprobs may be None when beta == 0.
  """
  loss, stats = clipped_policy_loss(
    logprobs, old_logprobs, advantages, mask, clip_eps=config.clip_eps, clip_eps_high=config.clip_eps_high,
    dual_clip=config.dual_clip, loss_agg=config.loss_agg,
  )  # fmt: skip
  if config.beta > 0:
    if ref_logprobs is None:
      raise ValueError("grpo_loss: ref_logprobs is required when GRPOConfig.beta > 0")
    common.check_shapes("grpo_loss", logprobs=logprobs, ref_logprobs=ref_logprobs)
    kl = aggregate_loss(get_kl(config.kl_estimator)(logprobs, ref_logprobs), mask, config.loss_agg)
    stats["kl"] = kl
    loss = loss + config.beta * kl
  stats["loss"] = loss
  return loss, stats

"""ReMax (Li et al. 2023) and the REINFORCE loss it shares with RLOO.

ReMax: REINFORCE with the reward of the greedy response to the same prompt as baseline; no critic.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from real_jax.algorithms import common
from real_jax.algorithms.common import Array, aggregate_loss
from real_jax.algorithms.ppo import discounted_returns
from real_jax.algorithms.registry import KL_ESTIMATORS, register_advantage, register_loss


@dataclasses.dataclass(frozen=True)
class ReMaxConfig:
  """ReMax hyperparameters.

  Attributes:
    kl_coef: coefficient of the in-reward KL penalty (0 disables it).
    kl_estimator: registered KL estimator for the per-token penalty ("k1").
    loss_agg: aggregation of the REINFORCE loss.
  """

  kl_coef: float = 0.0
  kl_estimator: str = "k1"
  loss_agg: str = "token_mean"

  def __post_init__(self):
    c = "ReMaxConfig"
    common.require(c, "kl_coef", self.kl_coef, common.is_num(self.kl_coef) and self.kl_coef >= 0, "a number >= 0")
    common.require_choice(c, "kl_estimator", self.kl_estimator, KL_ESTIMATORS.names())
    common.require_choice(c, "loss_agg", self.loss_agg, common.LOSS_AGGREGATIONS)


@register_advantage("remax")
def remax_advantages(
  scores: Array, greedy_scores: Array, mask: Array, kl: Array | None = None, kl_coef=0.0
) -> Array:
  """A_bt = (score_b - greedy_score_b) - kl_coef * sum_{s >= t} kl_bs m_bs,   for m_bt = 1.

  Without KL, every response token of row b gets score_b - greedy_score_b. With a per-token KL
  [B, T] (e.g. kl_k1 of the sampled response), the KL enters as a per-token reward -kl_coef * kl,
  so each token's advantage is its reward-to-go (gamma = 1) minus the baseline; the baseline is the
  greedy score alone. Returns [B, T], 0 off the mask.
  """
  common.check_rank("remax_advantages", 1, scores=scores, greedy_scores=greedy_scores)
  common.check_rank("remax_advantages", 2, mask=mask)
  sel = jnp.asarray(mask) != 0
  adv = (jnp.asarray(scores, jnp.float32) - jnp.asarray(greedy_scores, jnp.float32))[:, None] * sel
  if kl is not None:
    common.check_shapes("remax_advantages", mask=mask, kl=kl)
    adv = adv - jnp.asarray(kl_coef, jnp.float32) * discounted_returns(kl, mask, gamma=1.0)
  return adv


@register_loss("reinforce")
def reinforce_loss(
  logprobs: Array, advantages: Array, mask: Array, *, loss_agg: str = "token_mean"
) -> tuple[Array, dict[str, Array]]:
  """REINFORCE: loss = aggregate(-A_t * logp_t, mask); A is treated as a constant (stop-gradient)."""
  common.check_shapes("reinforce_loss", logprobs=logprobs, advantages=advantages, mask=mask)
  a = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
  loss = aggregate_loss(-a * jnp.asarray(logprobs, jnp.float32), mask, loss_agg)
  return loss, {"loss": loss, "advantage_mean": common.masked_mean(a, mask)}

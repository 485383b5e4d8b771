"""RLOO (Kool et al. 2019; Ahmadian et al. 2024): REINFORCE with a leave-one-out group baseline."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from real_jax.algorithms import common
from real_jax.algorithms.common import Array
from real_jax.algorithms.registry import KL_ESTIMATORS, register_advantage


@dataclasses.dataclass(frozen=True)
class RLOOConfig:
  """RLOO hyperparameters.

  Attributes:
    group_size: k >= 2 samples per prompt.
    kl_coef: beta of the sequence-level KL penalty folded into each sample's reward before the
      leave-one-out baseline (as in Ahmadian et al. 2024); 0 disables it.
    kl_estimator: registered per-token KL estimator summed over the response ("k1").
    loss_agg: aggregation of the REINFORCE loss.
  """

  group_size: int = 4
  kl_coef: float = 0.05
  kl_estimator: str = "k1"
  loss_agg: str = "token_mean"

  def __post_init__(self):
    c = "RLOOConfig"
    ok = common.is_pos_int(self.group_size) and self.group_size >= 2
    common.require(c, "group_size", self.group_size, ok, "an int >= 2")
    common.require(c, "kl_coef", self.kl_coef, common.is_num(self.kl_coef) and self.kl_coef >= 0, "a number >= 0")
    common.require_choice(c, "kl_estimator", self.kl_estimator, KL_ESTIMATORS.names())
    common.require_choice(c, "loss_agg", self.loss_agg, common.LOSS_AGGREGATIONS)


@register_advantage("rloo")
def rloo_advantages(rewards: Array, mask: Array, *, group_size: int, kl: Array | None = None,
                    kl_coef=0.0) -> Array:
  """A_i = r_i - (1 / (k - 1)) sum_{j != i} r_j   within each group of k = group_size samples.

  Equivalently A_i = k / (k - 1) * (r_i - mean_group). rewards [B] group-major (B a multiple of k,
  k >= 2); broadcast over the response: returns [B, T], 0 off the mask. With a per-token `kl` [B, T],
  each reward first becomes r_i - kl_coef * sum_t kl_it m_it (the sequence-level KL penalty).
  """
  if group_size < 2:
    raise ValueError(f"rloo_advantages: group_size must be >= 2, got {group_size}")
  rg = common.group_view(rewards, group_size, "rloo_advantages")
  common.check_rank("rloo_advantages", 2, mask=mask)
  if kl is not None:
    common.check_rank("rloo_advantages", 2, kl=kl)
    penalty = kl_coef * jnp.sum(jnp.asarray(kl) * (jnp.asarray(mask) != 0), axis=1)
    rg = rg - common.group_view(penalty, group_size, "rloo_advantages")
  baseline = (jnp.sum(rg, axis=1, keepdims=True) - rg) / (group_size - 1)
  return (rg - baseline).reshape(-1)[:, None] * (jnp.asarray(mask) != 0)

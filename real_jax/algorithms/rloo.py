"""RLOO (Kool et al. 2019; Ahmadian et al. 2024): REINFORCE with a leave-one-out group baseline."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from real_jax.algorithms import common
from real_jax.algorithms.common import Array
from real_jax.algorithms.registry import register_advantage


@dataclasses.dataclass(frozen=True)
class RLOOConfig:
  """RLOO hyperparameters: group_size k >= 2 samples per prompt; loss_agg of the REINFORCE loss."""

  group_size: int = 4
  loss_agg: str = "token_mean"

  def __post_init__(self):
    ok = common.is_pos_int(self.group_size) and self.group_size >= 2
    common.require("RLOOConfig", "group_size", self.group_size, ok, "an int >= 2")
    common.require_choice("RLOOConfig", "loss_agg", self.loss_agg, common.LOSS_AGGREGATIONS)


@register_advantage("rloo")
def rloo_advantages(rewards: Array, mask: Array, *, group_size: int) -> Array:
  """A_i = r_i - (1 / (k - 1)) sum_{j != i} r_j   within each group of k = group_size samples.

  Equivalently A_i = k / (k - 1) * (r_i - mean_group). rewards [B] group-major (B a multiple of k,
  k >= 2); broadcast over the response: returns [B, T], 0 off the mask.
  """
  if group_size < 2:
    raise ValueError(f"rloo_advantages: group_size must be >= 2, got {group_size}")
  rg = common.group_view(rewards, group_size, "rloo_advantages")
  common.check_rank("rloo_advantages", 2, mask=mask)
  baseline = (jnp.sum(rg, axis=1, keepdims=True) - rg) / (group_size - 1)
  return (rg - baseline).reshape(-1)[:, None] * (jnp.asarray(mask) != 0)

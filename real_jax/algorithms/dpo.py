"""DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023) from sequence log-probabilities.

Inputs are per-sequence summed log-probs [B] of the chosen and rejected responses under the policy
and the frozen reference: `common.sequence_logprobs(logprobs, mask)` turns per-token [B, T] into them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from real_jax.algorithms import common
from real_jax.algorithms.common import Array
from real_jax.algorithms.registry import register_loss


PREFERENCE_LOSSES = ("dpo_sigmoid", "ipo")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """DPO hyperparameters: beta > 0; label_smoothing in [0, 0.5) (conservative DPO); loss_type a
  registered preference loss ("dpo_sigmoid" or "ipo")."""

  beta: float = 0.1
  label_smoothing: float = 0.0
  loss_type: str = "dpo_sigmoid"

  def __post_init__(self):
    c = "DPOConfig"
    common.require(c, "beta", self.beta, common.is_num(self.beta) and self.beta > 0, "a number > 0")
    ls = self.label_smoothing
    common.require(c, "label_smoothing", ls, common.is_num(ls) and 0 <= ls < 0.5, "a number in [0, 0.5)")
    common.require_choice(c, "loss_type", self.loss_type, PREFERENCE_LOSSES)


def _margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected, fn_name):
  common.check_rank(fn_name, 1, policy_chosen_logps=policy_chosen)
  common.check_shapes(fn_name, policy_chosen_logps=policy_chosen, policy_rejected_logps=policy_rejected,
                      ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)  # fmt: skip
  f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  chosen = f(policy_chosen) - f(ref_chosen)
  rejected = f(policy_rejected) - f(ref_rejected)
  return chosen, rejected, chosen - rejected


def _stats(beta, chosen, rejected, h):
  return {
    "chosen_rewards": jnp.mean(beta * chosen),
    "rejected_rewards": jnp.mean(beta * rejected),
    "reward_margin": jnp.mean(beta * h),
    "accuracy": jnp.mean((h > 0).astype(jnp.float32)),
  }


@register_loss("dpo_sigmoid")
def dpo_loss(
  policy_chosen_logps: Array,
  policy_rejected_logps: Array,
  ref_chosen_logps: Array,
  ref_rejected_logps: Array,
  *,
  beta: float,
  label_smoothing: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
  """DPO sigmoid loss with optional label smoothing (conservative DPO, eps = label_smoothing).

  h_b    = (logp_c - ref_c) - (logp_r - ref_r)
  loss   = mean_b[ -(1 - eps) log sigmoid(beta h_b) - eps log sigmoid(-beta h_b) ]
  Stats (batch means): chosen_rewards = beta (logp_c - ref_c), rejected_rewards, reward_margin =
  beta h, accuracy = fraction with h > 0. At h = 0 the loss is log 2.
  """
  chosen, rejected, h = _margins(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, "dpo_loss"
  )
  z = beta * h
  per = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
  loss = jnp.mean(per)
  return loss, {"loss": loss, **_stats(beta, chosen, rejected, h)}


@register_loss("ipo")
def ipo_loss(
  policy_chosen_logps: Array,
  policy_rejected_logps: Array,
  ref_chosen_logps: Array,
  ref_rejected_logps: Array,
  *,
  beta: float,
  label_smoothing: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
  """IPO: loss = mean_b (h_b - 1 / (2 beta))^2, h as in dpo_loss (label_smoothing is ignored)."""
  del label_smoothing
  chosen, rejected, h = _margins(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, "ipo_loss"
  )
  loss = jnp.mean(jnp.square(h - 1.0 / (2.0 * beta)))
  return loss, {"loss": loss, **_stats(beta, chosen, rejected, h)}

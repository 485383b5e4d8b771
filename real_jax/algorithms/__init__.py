"""RLHF algorithm math: pure, jittable advantage, loss and KL functions, picked by name.

Shape legend: B sequences, T response tokens, V vocab, G group size. Every per-token array is
[B, T] float32 aligned to response tokens; `mask` is 1.0 on them (contiguous), `scores`/`rewards`
are per-sequence [B], `no_eos` [B] bool. Registries: `get_advantage("gae")`, `get_loss("ppo_clip")`,
`get_kl("k3")`; `list_advantages()` etc. name what is registered.
"""

from real_jax.algorithms.registry import (
  get_advantage,
  get_kl,
  get_loss,
  list_advantages,
  list_kls,
  list_losses,
  register_advantage,
  register_kl,
  register_loss,
)
from real_jax.algorithms.common import (
  LOSS_AGGREGATIONS,
  AdaptiveKLController,
  FixedKLController,
  aggregate_loss,
  aggregation_weight,
  apply_no_eos_penalty,
  entropy_from_logits,
  kl_k1,
  kl_k2,
  kl_k3,
  last_token_onehot,
  last_token_value,
  masked_entropy,
  masked_mean,
  masked_sum,
  masked_var,
  masked_whiten,
  scale_and_clip_rewards,
  sequence_logprobs,
)
from real_jax.algorithms.ppo import (
  PPOConfig,
  clipped_policy_loss,
  clipped_value_loss,
  discounted_returns,
  gae_advantages,
  ppo_actor_loss,
  ppo_advantages,
  ppo_critic_loss,
  compute_token_rewards,
)
from real_jax.algorithms.grpo import GRPOConfig, grpo_advantages, grpo_loss
from real_jax.algorithms.remax import ReMaxConfig, reinforce_loss, remax_advantages
from real_jax.algorithms.rloo import RLOOConfig, rloo_advantages
from real_jax.algorithms.dpo import DPOConfig, dpo_loss, ipo_loss
from real_jax.algorithms.sft import sft_loss
from real_jax.algorithms.reward_model import bradley_terry_loss

__all__ = [
  "AdaptiveKLController", "DPOConfig", "FixedKLController", "GRPOConfig", "LOSS_AGGREGATIONS", "PPOConfig",
  "RLOOConfig", "ReMaxConfig", "aggregate_loss", "aggregation_weight", "apply_no_eos_penalty", "bradley_terry_loss",
  "clipped_policy_loss", "clipped_value_loss", "discounted_returns", "dpo_loss", "entropy_from_logits",
  "gae_advantages", "get_advantage", "get_kl", "get_loss", "grpo_advantages", "grpo_loss", "ipo_loss", "kl_k1",
  "kl_k2", "kl_k3", "last_token_onehot", "last_token_value", "list_advantages", "list_kls", "list_losses",
  "masked_entropy", "masked_mean", "masked_sum", "masked_var", "masked_whiten", "ppo_actor_loss",
  "ppo_advantages", "ppo_critic_loss", "register_advantage", "register_kl", "register_loss", "reinforce_loss",
  "remax_advantages", "rloo_advantages", "scale_and_clip_rewards", "sequence_logprobs", "sft_loss",
  "compute_token_rewards",
]  # fmt: skip

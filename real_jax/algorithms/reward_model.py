"""Reward-model training: pairwise Bradley-Terry loss on (chosen, rejected) scores."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from real_jax.algorithms import common
from real_jax.algorithms.common import Array
from real_jax.algorithms.registry import register_loss


@register_loss("bradley_terry")
def bradley_terry_loss(
  chosen_scores: Array, rejected_scores: Array, *, margin: Array | None = None
) -> tuple[Array, dict[str, Array]]:
  """loss = mean_b -log sigmoid(s_c - s_r - margin_b)   (margin 0 unless given, Llama-2 style).

  P(chosen > rejected) = sigmoid(s_c - s_r) under Bradley-Terry. Scores are [B], e.g. the scalar
  head at the last response token (`common.last_token_value(values, mask)`).
  Stats: accuracy = fraction with s_c > s_r (ties count as wrong), score_margin = mean(s_c - s_r),
  chosen_score, rejected_score (means).
  """
  common.check_rank("bradley_terry_loss", 1, chosen_scores=chosen_scores)
  common.check_shapes("bradley_terry_loss", chosen_scores=chosen_scores, rejected_scores=rejected_scores, margin=margin)
  sc = jnp.asarray(chosen_scores, jnp.float32)
  sr = jnp.asarray(rejected_scores, jnp.float32)
  d = sc - sr
  z = d if margin is None else d - jnp.asarray(margin, jnp.float32)
  loss = jnp.mean(-jax.nn.log_sigmoid(z))
  return loss, {
    "loss": loss,
    "accuracy": jnp.mean((d > 0).astype(jnp.float32)),
    "score_margin": jnp.mean(d),
    "chosen_score": jnp.mean(sc),
    "rejected_score": jnp.mean(sr),
  }

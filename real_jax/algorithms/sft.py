"""Supervised fine-tuning: masked negative log-likelihood of the target tokens."""

from __future__ import annotations

import jax.numpy as jnp

from real_jax.algorithms import common
from real_jax.algorithms.common import Array
from real_jax.algorithms.registry import register_loss


@register_loss("sft")
def sft_loss(logprobs: Array, mask: Array, *, loss_agg: str = "token_mean") -> tuple[Array, dict[str, Array]]:
  """NLL = aggregate(-logp_t, mask): -sum m logp / sum m for "token_mean".

  `logprobs` [B, T] are log pi(token_t | prefix) of the target tokens (from the log-softmax of the
  logits at the preceding position). Stats: nll (token mean), ppl = exp(nll), n_tokens.
  """
  common.check_shapes("sft_loss", logprobs=logprobs, mask=mask)
  nll_tok = -jnp.asarray(logprobs, jnp.float32)
  loss = common.aggregate_loss(nll_tok, mask, loss_agg)
  nll = common.masked_mean(nll_tok, mask)
  n_tokens = jnp.sum(jnp.asarray(mask) != 0).astype(jnp.float32)
  return loss, {"loss": loss, "nll": nll, "ppl": jnp.exp(nll), "n_tokens": n_tokens}

"""Offline programs: DPO, SFT and reward-model training. Their "generate" is the data loader.

    DPO:  ref_inf -> actor_train      (preference pairs; the reference's sequence log-probs once per batch)
    SFT:  actor_train                 (prompt + completion, loss on the completion)
    RM:   reward_train                (preference pairs, pairwise Bradley-Terry on last-token scores)

The loop feeds PREFERENCE_KEYS (`chosen_tokens`, `chosen_mask`, `chosen_loss_mask`, and the same for
`rejected`; right-padded, the loss mask True on response tokens) or SFT_KEYS as external inputs.
One iteration is one batch and one train step. The step's metrics are computed with the parameters
*before* its update, on a batch the model has not trained on (built-in data never repeats; a file
repeats only after an epoch), so they are progressive held-out measurements: DPO's `margin`
(chosen-minus-rejected log-ratio), the reward model's `accuracy`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from real_jax import inference
from real_jax.algorithms import DPOConfig, bradley_terry_loss, get_loss, last_token_value, sft_loss
from real_jax.dataflow import Call, Graph
from real_jax.runtime.program import PREFERENCE_KEYS, SFT_KEYS, I, Program, T, bind
from real_jax.runtime.registry import register_program


def _shifted(loss_mask):
  """Token-level mask -> the shifted log-prob mask (column t scores token t+1)."""
  return jnp.pad(loss_mask[:, 1:], ((0, 0), (0, 1))).astype(jnp.float32)


def _seq_logprobs(model, tokens, mask, loss_mask):
  lp = model.token_logprobs(tokens, mask, train=True)
  return jnp.sum(lp * _shifted(loss_mask), axis=1)


def _dpo_loss(config: DPOConfig, model, batch):
  pc = _seq_logprobs(model, batch["chosen_tokens"], batch["chosen_mask"], batch["chosen_loss_mask"])
  pr = _seq_logprobs(model, batch["rejected_tokens"], batch["rejected_mask"], batch["rejected_loss_mask"])
  loss, stats = get_loss(config.loss_type)(pc, pr, batch["ref_chosen_logps"], batch["ref_rejected_logps"],
                                          beta=config.beta, label_smoothing=config.label_smoothing)
  stats["margin"] = stats["reward_margin"] / config.beta  # Mean chosen-minus-rejected log-ratio.
  return loss, stats


def _sft_loss(model, batch):
  lp = model.token_logprobs(batch["tokens"], batch["mask"], train=True)
  return sft_loss(lp, _shifted(batch["loss_mask"]))


def _rm_loss(model, batch):
  def score(side):
    values = model(batch[f"{side}_tokens"], attention_mask_BT=batch[f"{side}_mask"], train=True)
    return last_token_value(values, batch[f"{side}_mask"])
  return bradley_terry_loss(score("chosen"), score("rejected"))


@register_program("dpo")
class DPOProgram(Program):
  """DPO (or IPO, `config.dpo.loss_type`) against a frozen reference."""

  data = "preferences"

  @classmethod
  def graph(cls, exp) -> Graph:
    pairs = exp.data.batch_size
    return Graph([
        Call("ref_inf", "ref", I, PREFERENCE_KEYS, ("ref_chosen_logps", "ref_rejected_logps"), pairs),
        Call("actor_train", "actor", T, PREFERENCE_KEYS + ("ref_chosen_logps", "ref_rejected_logps"),
             ("actor_stats",), pairs),
    ], models=("actor", "ref"), external=PREFERENCE_KEYS)

  @classmethod
  def train_rows(cls, exp) -> dict[str, int]:
    return {"actor_train": exp.data.batch_size}

  def functions(self):
    return {"ref_inf": self.ref_inf, "actor_train": self.actor_train}

  def ref_inf(self, engine, call, layout, params, args):
    out = {}
    for side in ("chosen", "rejected"):
      lp = inference.logprobs((self.graphdefs["ref"], params), args[f"{side}_tokens"], args[f"{side}_mask"], layout)
      out[f"ref_{side}_logps"] = _masked_sum(lp, args[f"{side}_loss_mask"])
    return out

  def actor_train(self, engine, call, layout, params, args):
    batch = {k: args[k] for k in call.inputs}
    return {"actor_stats": self.train(engine, layout, "actor", bind(_dpo_loss, self.exp.dpo), batch)}

  def end_iteration(self, data) -> dict[str, float]:
    out = self.stats_metrics(data, ("actor",))
    out["margin"] = out["actor/margin"]
    out["accuracy"] = out["actor/accuracy"]
    return out


@register_program("sft")
class SFTProgram(Program):
  """Supervised fine-tuning of the actor on demonstrations."""

  data = "sft"

  @classmethod
  def graph(cls, exp) -> Graph:
    return Graph([Call("actor_train", "actor", T, SFT_KEYS, ("actor_stats",), exp.data.batch_size)],
                 models=("actor",), external=SFT_KEYS)

  @classmethod
  def train_rows(cls, exp) -> dict[str, int]:
    return {"actor_train": exp.data.batch_size}

  def functions(self):
    return {"actor_train": self.actor_train}

  def actor_train(self, engine, call, layout, params, args):
    return {"actor_stats": self.train(engine, layout, "actor", _sft_loss, dict(args))}

  def end_iteration(self, data) -> dict[str, float]:
    out = self.stats_metrics(data, ("actor",))
    out["nll"] = out["actor/nll"]
    return out


@register_program("rm")
class RewardModelProgram(Program):
  """Reward-model training on preference pairs (pairwise Bradley-Terry on the scalar head)."""

  data = "preferences"

  @classmethod
  def graph(cls, exp) -> Graph:
    return Graph([Call("reward_train", "reward", T, PREFERENCE_KEYS, ("reward_stats",), exp.data.batch_size)],
                 models=("reward",), external=PREFERENCE_KEYS)

  @classmethod
  def train_rows(cls, exp) -> dict[str, int]:
    return {"reward_train": exp.data.batch_size}

  def functions(self):
    return {"reward_train": self.reward_train}

  def reward_train(self, engine, call, layout, params, args):
    return {"reward_stats": self.train(engine, layout, "reward", _rm_loss, dict(args))}

  def end_iteration(self, data) -> dict[str, float]:
    out = self.stats_metrics(data, ("reward",))
    out["accuracy"] = out["reward/accuracy"]
    return out


@jax.jit
def _masked_sum(lp, loss_mask):
  return jnp.sum(lp * _shifted(loss_mask), axis=1)


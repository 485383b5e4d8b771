"""PPO as a program for the engine: the six calls and what each one computes.

    actor_gen -> {reward_inf, ref_inf, critic_inf} -> {actor_train, critic_train}

Alignment (see `program`): every per-token array is over the whole sequence [B, T] in the shifted
convention, so log-probs, reference log-probs and values (`values[:, t]` is the critic's value of the
state after token t, i.e. before the action token t+1) line up column by column, and the PPO math
(`real_jax.algorithms.ppo`) runs on them directly with `mask = logprob_mask`.

Both train calls recompute the advantages from the same inputs (cheap), so actor_train and
critic_train do not depend on each other and can run concurrently on disjoint meshes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from real_jax.algorithms import (PPOConfig, aggregation_weight, ppo_actor_loss, ppo_advantages,
                                 ppo_critic_loss)
from real_jax.dataflow import Call, Graph
from real_jax.runtime.engine import batch_target
from real_jax.runtime.program import ROLLOUT_KEYS, G, I, Program, T, bind, host
from real_jax.runtime.registry import register_program
from real_jax.train_step import LOSS_WEIGHT

TRAIN_KEYS = ("tokens", "attn_mask", "logprobs", "logprob_mask", "ref_logprobs", "values")


def ppo_graph(rows: int) -> Graph:
  """The six PPO calls on `rows` sequences per iteration."""
  train_in = ROLLOUT_KEYS + ("ref_logprobs", "scores", "values")
  return Graph([
      Call("actor_gen", "actor", G, ("prompts", "prompt_mask"), ROLLOUT_KEYS, rows),
      Call("reward_inf", "reward", I, ("tokens", "attn_mask", "logprob_mask"), ("scores",), rows),
      Call("ref_inf", "ref", I, ("tokens", "attn_mask"), ("ref_logprobs",), rows),
      Call("critic_inf", "critic", I, ("tokens", "attn_mask"), ("values",), rows),
      Call("actor_train", "actor", T, train_in, ("actor_stats",), rows),
      Call("critic_train", "critic", T, train_in, ("critic_stats",), rows),
  ], models=("actor", "critic", "ref", "reward"), external=("prompts", "prompt_mask"))


# -- losses (module-level functions bound once per program, so the jit cache keys are stable) ----


def _actor_loss(config: PPOConfig, temperature: float, model, batch):
  out = model.token_logprobs(batch["tokens"], batch["attn_mask"], temperature=temperature, train=True,
                             entropy=config.entropy_coef > 0)
  logp, entropy = out if config.entropy_coef > 0 else (out, None)
  mask = batch["logprob_mask"].astype(jnp.float32)
  loss, aux = ppo_actor_loss(logp, batch["logprobs"], batch["ref_logprobs"], batch["advantages"], mask,
                             batch["kl_coef"][0], config=config, entropy=entropy)
  return loss, {**aux, LOSS_WEIGHT: aggregation_weight(mask, config.loss_agg)}


def _critic_loss(config: PPOConfig, model, batch):
  values = model(batch["tokens"], attention_mask_BT=batch["attn_mask"], train=True)
  mask = batch["logprob_mask"].astype(jnp.float32)
  loss, aux = ppo_critic_loss(values, batch["values"], batch["returns"], mask, config=config)
  return loss, {**aux, LOSS_WEIGHT: aggregation_weight(mask, config.loss_agg)}


@register_program("ppo")
class PPOProgram(Program):
  """The call functions of PPO plus its small mutable state (adaptive KL coefficient)."""

  def __init__(self, exp, graphdefs, sampling=None, reward_rule=None):
    super().__init__(exp, graphdefs, sampling, reward_rule)
    self.config: PPOConfig = exp.ppo
    self.kl = self.config.kl_controller()
    self.kl_coef = float(self.config.kl_coef)
    self._actor_loss = bind(_actor_loss, self.config, float(self.sampling.temperature))
    self._critic_loss = bind(_critic_loss, self.config)

  @classmethod
  def graph(cls, exp) -> Graph:
    return ppo_graph(exp.data.batch_size * exp.sampling.n_samples)

  @classmethod
  def train_rows(cls, exp) -> dict[str, int]:
    rows = exp.data.batch_size * exp.sampling.n_samples // exp.ppo.mini_batches
    return {"actor_train": rows, "critic_train": rows}

  def functions(self):
    return {"actor_gen": self.actor_gen, "reward_inf": self.reward_inf, "ref_inf": self.ref_inf,
            "critic_inf": self.critic_inf, "actor_train": self.actor_train, "critic_train": self.critic_train}

  # -- calls ---------------------------------------------------------------------------------

  def actor_gen(self, engine, call, layout, params, args):
    return self.rollout(engine, layout, params, args)

  def reward_inf(self, engine, call, layout, params, args):
    return {"scores": self.scores(layout, params, args["tokens"], args["attn_mask"], args["logprob_mask"])}

  def ref_inf(self, engine, call, layout, params, args):
    return {"ref_logprobs": self.logprobs("ref", layout, params, args["tokens"], args["attn_mask"])}

  def critic_inf(self, engine, call, layout, params, args):
    return {"values": self.values("critic", layout, params, args["tokens"], args["attn_mask"])}

  def _advantages(self, args):
    mask = args["logprob_mask"].astype(jnp.float32)
    return _ppo_adv(args["scores"], args["logprobs"], args["ref_logprobs"], args["values"], mask,
                    args["no_eos"], np.float32(self.kl_coef), self.config)

  def _train(self, engine, layout, args, role, loss_fn, extra):
    batch = {k: args[k] for k in TRAIN_KEYS}
    batch.update(extra)
    # Made on the call's own devices: a jnp array would be made on jax.devices()[0] behind whatever is
    # queued there (in a disaggregated plan, the actor's train steps), and the critic's step would wait.
    rows = batch["tokens"].shape[0]
    batch["kl_coef"] = jax.device_put(np.full((rows,), self.kl_coef, np.float32), batch_target(layout, (rows,)))
    m = self.train(engine, layout, role, loss_fn, batch, epochs=self.config.ppo_epochs,
                   mini_batches=self.config.mini_batches)
    return {f"{role}_stats": m}

  def actor_train(self, engine, call, layout, params, args):
    adv = self._advantages(args)
    self.stats["actor_adv"] = adv
    return self._train(engine, layout, args, "actor", self._actor_loss, {"advantages": adv["advantages"]})

  def critic_train(self, engine, call, layout, params, args):
    adv = self._advantages(args)
    return self._train(engine, layout, args, "critic", self._critic_loss, {"returns": adv["returns"]})

  def state_dict(self) -> dict:
    return {"kl_coef": self.kl_coef}

  def load_state_dict(self, state: dict) -> None:
    self.kl_coef = float(state.get("kl_coef", self.kl_coef))

  def end_iteration(self, data) -> dict[str, float]:
    """Host-side metrics after an iteration; updates the adaptive KL coefficient."""
    adv = self.stats.pop("actor_adv")
    out = self.rollout_metrics(data)
    out.update({"kl": float(host(adv["mean_kl"])), "kl_coef": self.kl_coef})
    out.update(self.stats_metrics(data, ("actor", "critic")))
    rows = int(data["logprob_mask"].shape[0])
    self.kl_coef = float(self.kl.update(jnp.float32(self.kl_coef), out["kl"], rows))
    return out


@functools.partial(jax.jit, static_argnames=("config",))
def _ppo_adv(scores, logprobs, ref_logprobs, values, mask, no_eos, kl_coef, config):
  return ppo_advantages(scores, logprobs, ref_logprobs, values, mask, no_eos, kl_coef, config)

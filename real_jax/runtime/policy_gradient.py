"""Critic-free policy-gradient programs: GRPO, RLOO and ReMax.

    GRPO, RLOO:  actor_gen -> {reward_inf, ref_inf} -> actor_train
    ReMax:       actor_gen -> {reward_inf, ref_inf} ---------------> actor_train
                 actor_greedy -> reward_greedy_inf (baseline) ----/

GRPO and RLOO sample `config.sampling.n_samples` responses per prompt (rows group-major: rows
g*n .. g*n + n - 1 are prompt g's); the advantages are computed from the whole iteration's scores
before any mini-batching, so groups are never split. ReMax generates twice with the same actor:
sampled (rows = prompts x n) and greedy (rows = prompts), and uses the greedy response's score as
the baseline of every sample of its prompt. The reference model feeds GRPO's KL loss and ReMax's
in-reward KL, and RLOO's sequence-level KL penalty folded into each sample's reward before the
leave-one-out baseline; with a KL coefficient of 0 it only feeds the reported `kl`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from real_jax.algorithms import (GRPOConfig, aggregation_weight, ReMaxConfig, RLOOConfig, get_kl, grpo_advantages, grpo_loss,
                                 reinforce_loss, remax_advantages, rloo_advantages)
from real_jax.dataflow import Call, Graph
from real_jax.runtime.program import ROLLOUT_KEYS, G, I, Program, T, bind, host, mean_kl
from real_jax.runtime.registry import register_program
from real_jax.train_step import LOSS_WEIGHT

TRAIN_IN = ROLLOUT_KEYS + ("ref_logprobs", "scores")
TRAIN_KEYS = ("tokens", "attn_mask", "logprobs", "logprob_mask", "ref_logprobs", "advantages")


def _grpo_loss(config: GRPOConfig, temperature: float, model, batch):
  logp = model.token_logprobs(batch["tokens"], batch["attn_mask"], temperature=temperature, train=True)
  ref = batch["ref_logprobs"] if config.beta > 0 else None
  mask = batch["logprob_mask"].astype(jnp.float32)
  loss, aux = grpo_loss(logp, batch["logprobs"], ref, batch["advantages"], mask, config=config)
  return loss, {**aux, LOSS_WEIGHT: aggregation_weight(mask, config.loss_agg)}


def _reinforce_loss(loss_agg: str, temperature: float, model, batch):
  logp = model.token_logprobs(batch["tokens"], batch["attn_mask"], temperature=temperature, train=True)
  mask = batch["logprob_mask"].astype(jnp.float32)
  loss, aux = reinforce_loss(logp, batch["advantages"], mask, loss_agg=loss_agg)
  return loss, {**aux, LOSS_WEIGHT: aggregation_weight(mask, loss_agg)}


class _CriticFree(Program):
  """actor_gen, reward_inf, ref_inf and actor_train; subclasses supply the advantages and the loss."""

  epochs, mini_batches = 1, 1

  @classmethod
  def _calls(cls, exp) -> list[Call]:
    rows = exp.data.batch_size * exp.sampling.n_samples
    return [
        Call("actor_gen", "actor", G, ("prompts", "prompt_mask"), ROLLOUT_KEYS, rows),
        Call("reward_inf", "reward", I, ("tokens", "attn_mask", "logprob_mask"), ("scores",), rows),
        Call("ref_inf", "ref", I, ("tokens", "attn_mask"), ("ref_logprobs",), rows),
        Call("actor_train", "actor", T, TRAIN_IN, ("actor_stats",), rows),
    ]

  @classmethod
  def graph(cls, exp) -> Graph:
    return Graph(cls._calls(exp), models=("actor", "ref", "reward"), external=("prompts", "prompt_mask"))

  @classmethod
  def train_rows(cls, exp) -> dict[str, int]:
    return {"actor_train": exp.data.batch_size * exp.sampling.n_samples // cls._mini_batches(exp)}

  @classmethod
  def _mini_batches(cls, exp) -> int:
    return 1

  def functions(self):
    return {"actor_gen": self.actor_gen, "reward_inf": self.reward_inf, "ref_inf": self.ref_inf,
            "actor_train": self.actor_train}

  def actor_gen(self, engine, call, layout, params, args):
    return self.rollout(engine, layout, params, args)

  def reward_inf(self, engine, call, layout, params, args):
    return {"scores": self.scores(layout, params, args["tokens"], args["attn_mask"], args["logprob_mask"])}

  def ref_inf(self, engine, call, layout, params, args):
    return {"ref_logprobs": self.logprobs("ref", layout, params, args["tokens"], args["attn_mask"])}

  def advantages(self, args) -> jax.Array:
    raise NotImplementedError

  def loss_fn(self):
    raise NotImplementedError

  def actor_train(self, engine, call, layout, params, args):
    batch = {k: args[k] for k in TRAIN_KEYS if k != "advantages"}
    batch["advantages"] = self.advantages(args)
    self.stats["kl"] = mean_kl(args["logprobs"], args["ref_logprobs"], args["logprob_mask"])
    m = self.train(engine, layout, "actor", self.loss_fn(), batch, epochs=self._epochs(),
                   mini_batches=self._mini_batches(self.exp))
    return {"actor_stats": m}

  def _epochs(self) -> int:
    return 1

  def end_iteration(self, data) -> dict[str, float]:
    out = self.rollout_metrics(data)
    out["kl"] = float(host(self.stats.pop("kl")))
    out.update(self.stats_metrics(data, ("actor",)))
    return out


@register_program("grpo")
class GRPOProgram(_CriticFree):
  """GRPO: group-normalised advantages, clipped policy loss, k3 KL-to-reference loss (`config.grpo`)."""

  def __init__(self, exp, graphdefs, sampling=None, reward_rule=None):
    super().__init__(exp, graphdefs, sampling, reward_rule)
    self.config: GRPOConfig = exp.grpo

  @classmethod
  def _mini_batches(cls, exp) -> int:
    return exp.grpo.mini_batches

  def _epochs(self) -> int:
    return self.config.ppo_epochs

  def advantages(self, args):
    c = self.config
    return _grpo_adv(args["scores"], args["logprob_mask"], c.group_size, c.scale_by_std, c.adv_eps)

  def loss_fn(self):
    return bind(_grpo_loss, self.config, float(self.sampling.temperature))


@register_program("rloo")
class RLOOProgram(_CriticFree):
  """RLOO: REINFORCE with the leave-one-out mean of the other samples of the prompt (`config.rloo`)."""

  def advantages(self, args):
    c = self.exp.rloo
    return _rloo_adv(args["scores"], args["logprob_mask"], args["logprobs"], args["ref_logprobs"],
                     np.float32(c.kl_coef), c.group_size, c.kl_estimator, c.kl_coef > 0)

  def loss_fn(self):
    return bind(_reinforce_loss, self.exp.rloo.loss_agg, float(self.sampling.temperature))


@register_program("remax")
class ReMaxProgram(_CriticFree):
  """ReMax: REINFORCE with the greedy response's score as baseline (`config.remax`)."""

  @classmethod
  def _calls(cls, exp) -> list[Call]:
    prompts = exp.data.batch_size
    greedy = ("greedy_" + k for k in ROLLOUT_KEYS)
    return super()._calls(exp)[:3] + [
        Call("actor_greedy", "actor", G, ("prompts", "prompt_mask"), tuple(greedy), prompts),
        Call("reward_greedy_inf", "reward", I, ("greedy_tokens", "greedy_attn_mask", "greedy_logprob_mask"),
             ("greedy_scores",), prompts),
        Call("actor_train", "actor", T, TRAIN_IN + ("greedy_scores",), ("actor_stats",),
             prompts * exp.sampling.n_samples),
    ]

  def functions(self):
    return {**super().functions(), "actor_greedy": self.actor_greedy, "reward_greedy_inf": self.reward_greedy_inf}

  def actor_greedy(self, engine, call, layout, params, args):
    greedy = dataclasses.replace(self.sampling, greedy=True, n=1)
    return self.rollout(engine, layout, params, args, sampling=greedy, salt=1, prefix="greedy_")

  def reward_greedy_inf(self, engine, call, layout, params, args):
    s = self.scores(layout, params, args["greedy_tokens"], args["greedy_attn_mask"], args["greedy_logprob_mask"])
    return {"greedy_scores": s}

  def advantages(self, args):
    c = self.exp.remax
    return _remax_adv(args["scores"], args["greedy_scores"], args["logprob_mask"], args["logprobs"],
                      args["ref_logprobs"], np.float32(c.kl_coef), c.kl_estimator, c.kl_coef > 0)

  def loss_fn(self):
    return bind(_reinforce_loss, self.exp.remax.loss_agg, float(self.sampling.temperature))

  def end_iteration(self, data) -> dict[str, float]:
    out = super().end_iteration(data)
    out["greedy_reward"] = float(np.mean(host(data["greedy_scores"])))
    return out


@functools.partial(jax.jit, static_argnames=("group_size", "scale_by_std", "eps"))
def _grpo_adv(scores, mask, group_size, scale_by_std, eps):
  return grpo_advantages(scores, mask.astype(jnp.float32), group_size=group_size, scale_by_std=scale_by_std, eps=eps)


@functools.partial(jax.jit, static_argnames=("group_size", "kl_estimator", "use_kl"))
def _rloo_adv(scores, mask, logprobs, ref_logprobs, kl_coef, group_size, kl_estimator, use_kl):
  m = mask.astype(jnp.float32)
  kl = get_kl(kl_estimator)(logprobs, ref_logprobs) * m if use_kl else None
  return rloo_advantages(scores, m, group_size=group_size, kl=kl, kl_coef=kl_coef)


@functools.partial(jax.jit, static_argnames=("kl_estimator", "use_kl"))
def _remax_adv(scores, greedy_scores, mask, logprobs, ref_logprobs, kl_coef, kl_estimator, use_kl):
  baseline = jnp.repeat(greedy_scores, scores.shape[0] // greedy_scores.shape[0])  # Group-major rows.
  m = mask.astype(jnp.float32)
  kl = get_kl(kl_estimator)(logprobs, ref_logprobs) * m if use_kl else None
  return remax_advantages(scores, baseline, m, kl, kl_coef)

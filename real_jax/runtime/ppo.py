"""PPO as a program for the engine: the six calls and what each one computes.

    actor_gen -> {reward_inf, ref_inf, critic_inf} -> {actor_train, critic_train}

Alignment: every per-token array is over the whole sequence [B, T] (prompt bucket P, then M
response slots) in the *shifted* convention of `real_jax.inference`: column t scores token t+1.
`logprob_mask[:, t]` is True where token t+1 is a response token, so log-probs, reference
log-probs and values (`values[:, t]` is the critic's value of the state after token t, i.e. before
the action token t+1) line up column by column, and the PPO math (`real_jax.algorithms.ppo`) runs
on them directly with `mask = logprob_mask`.

Both train calls recompute the advantages from the same inputs (cheap), so actor_train and
critic_train do not depend on each other and can run concurrently on disjoint meshes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from real_jax import inference
from real_jax.algorithms import PPOConfig, ppo_actor_loss, ppo_advantages, ppo_critic_loss
from real_jax.dataflow import Call, CallKind, Graph
from real_jax.generation import SamplingConfig, generate
from real_jax.optim import OptimizerConfig
from real_jax.train_step import train_step
from sharding import Layout, activation_sharding

G, I, T = CallKind.GENERATE, CallKind.INFERENCE, CallKind.TRAIN_STEP

ROLLOUT_KEYS = ("tokens", "attn_mask", "logprobs", "logprob_mask", "no_eos")


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
  logits = model(batch["tokens"], attention_mask_BT=batch["attn_mask"], train=True)
  logp = inference.token_logprobs(logits, batch["tokens"], temperature)
  mask = batch["logprob_mask"].astype(jnp.float32)
  entropy = None
  if config.entropy_coef > 0:
    from real_jax.algorithms import entropy_from_logits
    ent = entropy_from_logits(logits[:, :-1] / temperature)
    entropy = jnp.pad(ent, ((0, 0), (0, 1)))
  return ppo_actor_loss(logp, batch["logprobs"], batch["ref_logprobs"], batch["advantages"], mask,
                        batch["kl_coef"][0], config=config, entropy=entropy)


def _critic_loss(config: PPOConfig, model, batch):
  values = model(batch["tokens"], attention_mask_BT=batch["attn_mask"], train=True)
  mask = batch["logprob_mask"].astype(jnp.float32)
  return ppo_critic_loss(values, batch["values"], batch["returns"], mask, config=config)


@dataclasses.dataclass
class PPOProgram:
  """The call functions of PPO plus its small mutable state (adaptive KL coefficient, RNG)."""

  config: PPOConfig
  sampling: SamplingConfig
  optim: dict[str, OptimizerConfig]
  graphdefs: dict[str, Any]
  reward_rule: Any = None  # (prompts, answers, response_BT, mask_BT) -> np.ndarray scores, when rule-based.
  seed: int = 0

  def __post_init__(self):
    self.kl = self.config.kl_controller()
    self.kl_coef = float(self.config.kl_coef)
    self.host_batch: dict = {}
    self._actor_loss = functools.partial(_actor_loss, self.config, float(self.sampling.temperature))
    self._critic_loss = functools.partial(_critic_loss, self.config)
    self.stats: dict[str, Any] = {}

  def functions(self):
    return {"actor_gen": self.actor_gen, "reward_inf": self.reward_inf, "ref_inf": self.ref_inf,
            "critic_inf": self.critic_inf, "actor_train": self.actor_train, "critic_train": self.critic_train}

  # -- calls ---------------------------------------------------------------------------------

  def actor_gen(self, engine, call, layout, params, args):
    rng = jax.random.fold_in(jax.random.key(self.seed), engine.iteration)
    ro = generate((self.graphdefs["actor"], params), args["prompts"], args["prompt_mask"], rng, self.sampling,
                  layout)
    return {"tokens": ro.tokens, "attn_mask": ro.attention_mask, "logprobs": ro.logprobs,
            "logprob_mask": ro.logprob_mask, "no_eos": ~ro.ended_with_eos}

  def reward_inf(self, engine, call, layout, params, args):
    if self.reward_rule is not None:  # Host-side rule: blocks on the rollout (by necessity).
      tokens = np.asarray(args["tokens"])
      mask = np.asarray(args["logprob_mask"])
      resp_mask = np.pad(mask[:, :-1], ((0, 0), (1, 0)))  # Token t+1 is a response token -> mask at t+1.
      scores = self.reward_rule(self.host_batch, tokens, resp_mask)
      sh = activation_sharding(layout, ("batch",), scores.shape)
      return {"scores": jax.device_put(jnp.asarray(scores, jnp.float32), sh)}
    _, scores = inference.values((self.graphdefs["reward"], params), args["tokens"], args["attn_mask"], layout)
    return {"scores": scores}

  def ref_inf(self, engine, call, layout, params, args):
    lp = inference.logprobs((self.graphdefs["ref"], params), args["tokens"], args["attn_mask"], layout,
                            temperature=self.sampling.temperature)
    return {"ref_logprobs": lp}

  def critic_inf(self, engine, call, layout, params, args):
    v, _ = inference.values((self.graphdefs["critic"], params), args["tokens"], args["attn_mask"], layout)
    return {"values": v}

  def _advantages(self, args):
    mask = args["logprob_mask"].astype(jnp.float32)
    return _ppo_adv(args["scores"], args["logprobs"], args["ref_logprobs"], args["values"], mask,
                    args["no_eos"], jnp.float32(self.kl_coef), self.config)

  def _train(self, engine, call, layout, args, role, loss_fn, extra):
    slot = engine.slots[role]
    batch = {k: args[k] for k in ("tokens", "attn_mask", "logprobs", "logprob_mask", "ref_logprobs", "values")}
    batch.update(extra)
    rows = batch["tokens"].shape[0]
    batch["kl_coef"] = jnp.full((rows,), self.kl_coef, jnp.float32)
    batch = engine.move_batch(batch, layout)
    k = self.config.mini_batches
    metrics = []
    for epoch in range(self.config.ppo_epochs):
      perm = np.random.default_rng([self.seed, engine.iteration, epoch, hash(role) % 1000]).permutation(rows)
      for j in range(k):
        idx = np.sort(perm[j * rows // k:(j + 1) * rows // k])
        mb = batch if k == 1 else engine.move_batch(_take_rows(batch, idx), layout)
        slot.train_state, m = train_step(self.graphdefs[role], loss_fn, self.optim[role], layout,
                                         slot.train_state, mb)
        metrics.append(m)
    slot.set_params(slot.train_state.params)
    return {f"{role}_stats": metrics[-1]}

  def actor_train(self, engine, call, layout, params, args):
    adv = self._advantages(args)
    self.stats["actor_adv"] = adv
    return self._train(engine, call, layout, args, "actor", self._actor_loss, {"advantages": adv["advantages"]})

  def critic_train(self, engine, call, layout, params, args):
    adv = self._advantages(args)
    return self._train(engine, call, layout, args, "critic", self._critic_loss, {"returns": adv["returns"]})

  def end_iteration(self, data) -> dict[str, float]:
    """Host-side metrics after an iteration; updates the adaptive KL coefficient."""
    adv = self.stats.pop("actor_adv")
    mask = np.asarray(data["logprob_mask"])
    out = {
        "reward": float(np.mean(np.asarray(data["scores"]))),
        "kl": float(adv["mean_kl"]),
        "kl_coef": self.kl_coef,
        "response_len": float(mask.sum(axis=1).mean()),
        "no_eos_frac": float(np.mean(np.asarray(data["no_eos"]))),
    }
    for role in ("actor", "critic"):
      for k, v in data[f"{role}_stats"].items():
        out[f"{role}/{k}"] = float(v)
    self.kl_coef = float(self.kl.update(jnp.float32(self.kl_coef), out["kl"], int(mask.shape[0])))
    return out


@functools.partial(jax.jit, static_argnames=("config",))
def _ppo_adv(scores, logprobs, ref_logprobs, values, mask, no_eos, kl_coef, config):
  return ppo_advantages(scores, logprobs, ref_logprobs, values, mask, no_eos, kl_coef, config)


def _take_rows(batch: dict, idx: np.ndarray) -> dict:
  """Rows `idx` of every array, gathered on the batch's own devices (no host round trip)."""
  idx = jnp.asarray(idx, jnp.int32)
  return _gather(batch, idx)


@jax.jit
def _gather(batch, idx):
  return {k: v[idx] for k, v in batch.items()}

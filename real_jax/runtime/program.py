"""What every algorithm program shares: the base class and the call helpers.

A *program* turns an algorithm into something the engine runs: its dataflow graph (`graph`), one
function per call (`functions`), the host-side metrics of an iteration (`end_iteration`), and the
rows each train call steps on (`train_rows`, for plan checks before anything compiles). The helpers
below are the building blocks of the call functions, shared by every algorithm:

* `rollout`: the actor's generate call (sampled or greedy), in the rollout keys every program uses;
* `scores`: a rule on decoded text (host side, blocks on its inputs by necessity) or a reward model;
* `logprobs` / `values`: inference calls;
* `train`: epochs x mini-batches of train steps on the call's layout, updating the model's slot.

Per-token arrays follow the *shifted* convention of `real_jax.inference`: column t scores token t+1,
and `logprob_mask[:, t]` is True where token t+1 is a response token.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from real_jax import inference
from real_jax.dataflow import CallKind, Graph
from real_jax.generation import SamplingConfig, generate
from real_jax.runtime.engine import batch_target
from real_jax.train_step import train_step
from sharding import Layout, activation_sharding

G, I, T = CallKind.GENERATE, CallKind.INFERENCE, CallKind.TRAIN_STEP

ROLLOUT_KEYS = ("tokens", "attn_mask", "logprobs", "logprob_mask", "no_eos")
PREFERENCE_KEYS = ("chosen_tokens", "chosen_mask", "chosen_loss_mask",
                   "rejected_tokens", "rejected_mask", "rejected_loss_mask")
SFT_KEYS = ("tokens", "mask", "loss_mask")


class Program:
  """Base of the algorithm programs. Subclasses set the class attributes and define the calls.

  name: the `config.algorithm` value. data: what the loop feeds as external keys each iteration:
  "prompts" (`prompts`, `prompt_mask`), "preferences" (PREFERENCE_KEYS) or "sft" (SFT_KEYS).
  """

  name: ClassVar[str] = ""
  data: ClassVar[str] = "prompts"

  def __init__(self, exp, graphdefs: dict[str, Any], sampling: SamplingConfig | None = None,
               reward_rule: Callable | None = None):
    self.exp = exp
    self.graphdefs = graphdefs
    self.optim = dict(exp.optim)
    self.sampling = sampling
    self.reward_rule = reward_rule
    self.seed = exp.seed
    self.host_batch: dict = {}  # Per-prompt host data of the iteration (prompts, answers) for rule rewards.
    self.stats: dict[str, Any] = {}

  # -- what subclasses define ----------------------------------------------------------------

  @classmethod
  def graph(cls, exp) -> Graph:
    raise NotImplementedError

  @classmethod
  def train_rows(cls, exp) -> dict[str, int]:
    """Rows of one train step, per train call (the mini-batch size)."""
    return {}

  def functions(self) -> dict[str, Callable]:
    raise NotImplementedError

  def end_iteration(self, data: dict) -> dict[str, float]:
    raise NotImplementedError

  def state_dict(self) -> dict:
    """The program's mutable host state (JSON-able), saved in every checkpoint (e.g. PPO's
    adaptive KL coefficient). Parameters and optimizer states live in the engine's slots."""
    return {}

  def load_state_dict(self, state: dict) -> None:
    """Restores what `state_dict` returned (resume)."""
    del state

  # -- shared call helpers -------------------------------------------------------------------

  def rng(self, engine, salt: int = 0) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), engine.iteration), salt)

  def rollout(self, engine, layout: Layout, params, args, *, sampling: SamplingConfig | None = None,
              salt: int = 0, prefix: str = "") -> dict:
    """The actor's generate call; keys ROLLOUT_KEYS, each prefixed by `prefix`."""
    ro = generate((self.graphdefs["actor"], params), args["prompts"], args["prompt_mask"], self.rng(engine, salt),
                  sampling or self.sampling, layout)
    out = {"tokens": ro.tokens, "attn_mask": ro.attention_mask, "logprobs": ro.logprobs,
           "logprob_mask": ro.logprob_mask, "no_eos": ~ro.ended_with_eos}
    return {prefix + k: v for k, v in out.items()}

  def scores(self, layout: Layout, params, tokens, attn_mask, logprob_mask) -> jax.Array:
    """[B] sequence scores: the rule on decoded responses, or the reward model's last-token value."""
    if self.reward_rule is not None:  # Host side: blocks on this call's inputs (by necessity).
      tokens = host(tokens)
      mask = host(logprob_mask)
      resp_mask = np.pad(mask[:, :-1], ((0, 0), (1, 0)))  # Token t+1 is a response token -> mask at t+1.
      s = np.asarray(self.reward_rule(self.host_batch, tokens, resp_mask), np.float32)
      return jax.device_put(s, activation_sharding(layout, ("batch",), s.shape))
    _, s = inference.values((self.graphdefs["reward"], params), tokens, attn_mask, layout)
    return s

  def logprobs(self, role: str, layout: Layout, params, tokens, attn_mask) -> jax.Array:
    temperature = self.sampling.temperature if self.sampling is not None else 1.0
    return inference.logprobs((self.graphdefs[role], params), tokens, attn_mask, layout, temperature=temperature)

  def values(self, role: str, layout: Layout, params, tokens, attn_mask) -> jax.Array:
    v, _ = inference.values((self.graphdefs[role], params), tokens, attn_mask, layout)
    return v

  def train(self, engine, layout: Layout, role: str, loss_fn: Callable, batch: dict, *, epochs: int = 1,
            mini_batches: int = 1) -> dict:
    """`epochs` passes of `mini_batches` train steps over `batch` (rows shuffled per epoch, seeded).

    Updates the role's slot (train state and parameter version); returns the last step's metrics.
    """
    slot = engine.slots[role]
    batch = engine.move_batch(batch, layout)
    rows = jax.tree.leaves(batch)[0].shape[0]
    metrics = None
    for epoch in range(epochs):
      perm = np.random.default_rng([self.seed, engine.iteration, epoch, zlib.crc32(role.encode())]).permutation(rows)
      for j in range(mini_batches):
        idx = np.sort(perm[j * rows // mini_batches:(j + 1) * rows // mini_batches])
        mb = batch if mini_batches == 1 else take_rows(batch, idx, layout)
        slot.train_state, metrics = train_step(self.graphdefs[role], loss_fn, self.optim[role], layout,
                                               slot.train_state, mb)
    slot.set_params(slot.train_state.params)
    return metrics

  # -- shared metrics ------------------------------------------------------------------------

  def rollout_metrics(self, data: dict) -> dict[str, float]:
    mask = host(data["logprob_mask"])
    return {"reward": float(np.mean(host(data["scores"]))),
            "response_len": float(mask.sum(axis=1).mean()),
            "no_eos_frac": float(np.mean(host(data["no_eos"])))}

  @staticmethod
  def stats_metrics(data: dict, roles) -> dict[str, float]:
    return {f"{role}/{k}": float(host(v)) for role in roles for k, v in data[f"{role}_stats"].items()}


def host(x) -> np.ndarray:
  """`x` as a NumPy array on this host, also when it spans processes (multi-controller runs):
  replicated arrays are read from a local shard, others gathered with `process_allgather` (a
  collective: every process calls it in the same order, which the SPMD loop guarantees)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def take_rows(batch: dict, idx: np.ndarray, layout: Layout | None = None) -> dict:
  """Rows `idx` of every array, gathered on the batch's own devices (no host round trip).

  With `layout`, the rows come out placed as a batch under it (`engine.batch_target`), by the same
  program: one program per mini-batch instead of a gather and then a move per batch key.
  """
  idx = np.asarray(idx, np.int32)
  targets = None
  if layout is not None:
    targets = tuple((k, batch_target(layout, (len(idx),) + tuple(v.shape[1:]))) for k, v in sorted(batch.items()))
  return _gather(batch, idx, targets)


@functools.partial(jax.jit, static_argnames=("targets",))
def _gather(batch, idx, targets=None):
  out = {k: v[idx] for k, v in batch.items()}
  for k, sharding in targets or ():
    out[k] = jax.lax.with_sharding_constraint(out[k], sharding)
  return out


@jax.jit
def mean_kl(logprobs, ref_logprobs, mask):
  """Token mean of the k1 estimate log pi - log ref over response tokens (what PPO reports as kl)."""
  m = mask.astype(jnp.float32)
  return jnp.sum((logprobs - ref_logprobs) * m) / jnp.maximum(jnp.sum(m), 1.0)


@functools.lru_cache(maxsize=None)
def bind(fn: Callable, *args) -> Callable:
  """`functools.partial(fn, *args)`, the same object for equal args: jitted train steps are cached by
  their loss function, so two runs of one config (e.g. two tests) share compiled programs."""
  return functools.partial(fn, *args)

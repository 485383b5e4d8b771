"""The typed experiment: what a config file describes, as frozen dataclasses.

`experiment_from_config(config_dict)` is the one place a ConfigDict is read; it rejects unknown
keys, wrong types and inconsistent combinations with a ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from real_jax.algorithms import PPOConfig
from real_jax.config import ConfigError, from_dict
from real_jax.models import ModelConfig, get_config
from real_jax.optim import OptimizerConfig

ALGORITHMS = ("ppo",)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One RLHF role's network (or rule).

  preset: a `real_jax.models` preset name ("tiny", "7b", ...).
  overrides: ModelConfig field overrides, e.g. {"dtype": "bfloat16", "n_layers": 4}.
  head: "lm" (actor, ref) or "scalar" (critic, reward).
  init: "random", "hf:<dir>" (a HF checkpoint), or "copy:<role>" (the same initial weights as
    another role, e.g. the reference starts as the actor).
  rule: a rule-based reward (a task's reward, or a `real_jax.data` reward name) instead of a network;
    only for the reward role.
  seed: initialisation seed for init="random".
  """

  preset: str = "tiny"
  overrides: dict = dataclasses.field(default_factory=dict)
  head: str = "lm"
  init: str = "random"
  rule: str = ""
  seed: int = 0

  def __post_init__(self):
    if self.head not in ("lm", "scalar"):
      raise ValueError(f"head={self.head!r}: expected 'lm' or 'scalar'")
    if not (self.init == "random" or self.init.startswith(("hf:", "copy:"))):
      raise ValueError(f"init={self.init!r}: expected 'random', 'hf:<dir>' or 'copy:<role>'")

  def model_config(self) -> ModelConfig:
    try:
      return get_config(self.preset, **dict(self.overrides))
    except TypeError as e:
      raise ValueError(f"overrides: {e}") from None


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Where prompts come from: a built-in task, or a JSON-lines file with an HF tokenizer.

  task: built-in synthetic task ("reversal", "sorting", "arithmetic", "copy"), or "" for a file.
  task_kwargs: e.g. {"difficulty": 2}.
  path, prompt_key, answer_key, tokenizer: the JSON-lines file, its field names, tokenizer.json.
  batch_size: prompts per iteration.
  max_prompt_len: longer prompts are truncated (keeping the last tokens) or rejected per on_long.
  on_error: "raise" (a malformed line stops with file:line) or "skip" (skipped and counted).
  """

  task: str = "reversal"
  task_kwargs: dict = dataclasses.field(default_factory=dict)
  path: str = ""
  prompt_key: str = "prompt"
  answer_key: str = ""
  tokenizer: str = ""
  batch_size: int = 16
  max_prompt_len: int = 32
  on_error: str = "raise"
  on_long: str = "truncate"

  def __post_init__(self):
    if not self.task and not self.path:
      raise ValueError("set either task (a built-in task) or path (a JSON-lines file)")
    if self.batch_size < 1:
      raise ValueError(f"batch_size={self.batch_size} must be >= 1")
    if self.on_error not in ("raise", "skip"):
      raise ValueError(f"on_error={self.on_error!r}: expected 'raise' or 'skip'")
    if self.on_long not in ("truncate", "reject", "skip"):
      raise ValueError(f"on_long={self.on_long!r}: expected 'truncate', 'reject' or 'skip'")


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
  max_new_tokens: int = 16
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  n_samples: int = 1


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A whole run.

  algorithm: "ppo".
  num_iterations: RLHF iterations to run. checkpoint_every: checkpoint period (iterations).
  sft_warmup_steps: supervised steps on task demonstrations before RL (built-in tasks only), so a
    tiny random model starts from a policy that produces answers of the right shape.
  plan: "colocated" (every call on all devices with `colocated_strategy`), a path to a plan JSON,
    or an inline plan "call=START:SIZE/STRATEGY, ...".
  """

  algorithm: str = "ppo"
  seed: int = 0
  num_iterations: int = 10
  checkpoint_every: int = 0
  sft_warmup_steps: int = 0
  sft_learning_rate: float = 1e-3
  models: dict[str, ModelSpec] = dataclasses.field(default_factory=dict)
  optim: dict[str, OptimizerConfig] = dataclasses.field(default_factory=dict)
  data: DataSpec = DataSpec()
  sampling: SamplingSpec = SamplingSpec()
  ppo: PPOConfig = PPOConfig()
  plan: str = "colocated"
  colocated_strategy: str = ""
  log_every: int = 1

  def __post_init__(self):
    if self.algorithm not in ALGORITHMS:
      raise ValueError(f"algorithm={self.algorithm!r}: expected one of {ALGORITHMS}")
    if self.num_iterations < 0 or self.checkpoint_every < 0:
      raise ValueError("num_iterations and checkpoint_every must be >= 0")


def experiment_from_config(config: Any) -> Experiment:
  """Builds and validates the Experiment; errors name the config key (e.g. `config.ppo.mini_batches`)."""
  exp = from_dict(Experiment, config, "config")
  rows = exp.data.batch_size * exp.sampling.n_samples
  if rows % exp.ppo.mini_batches:
    raise ConfigError(f"config.ppo.mini_batches={exp.ppo.mini_batches} does not divide the rows per iteration "
                      f"(config.data.batch_size x config.sampling.n_samples = {rows})")
  roles = {"ppo": ("actor", "critic", "ref", "reward")}[exp.algorithm]
  for role in roles:
    if role not in exp.models:
      raise ConfigError(f"config.models.{role}: {exp.algorithm} needs a model for role {role!r}")
  for role, spec in exp.models.items():
    if spec.rule and role != "reward":
      raise ConfigError(f"config.models.{role}.rule: only the reward role may be rule-based")
    if spec.init.startswith("copy:") and spec.init[5:] not in exp.models:
      raise ConfigError(f"config.models.{role}.init={spec.init!r}: no role {spec.init[5:]!r}")
    try:
      spec.model_config()
    except ValueError as e:
      raise ConfigError(f"config.models.{role}: {e}") from None
  for role in ("actor", "critic"):
    if role in roles and role not in exp.optim:
      raise ConfigError(f"config.optim.{role}: a trained role needs optimizer settings")
  return exp

"""The typed experiment: what a config file describes, as frozen dataclasses.

`experiment_from_config(config_dict)` is the one place a ConfigDict is read; it rejects unknown
keys, wrong types and inconsistent combinations with a ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from real_jax.algorithms import DPOConfig, GRPOConfig, PPOConfig, ReMaxConfig, RLOOConfig
from real_jax.config import ConfigError, from_dict
from real_jax.data import get_task, list_rewards
from real_jax.models import ModelConfig, get_config
from real_jax.optim import OptimizerConfig

# algorithm -> (roles it needs, roles it trains). The runtime's programs (`real_jax.runtime`) build
# their graphs over exactly these roles.
ROLES = {
    "ppo": (("actor", "critic", "ref", "reward"), ("actor", "critic")),
    "grpo": (("actor", "ref", "reward"), ("actor",)),
    "rloo": (("actor", "ref", "reward"), ("actor",)),
    "remax": (("actor", "ref", "reward"), ("actor",)),
    "dpo": (("actor", "ref"), ("actor",)),
    "sft": (("actor",), ("actor",)),
    "rm": (("reward",), ("reward",)),
}
ALGORITHMS = tuple(ROLES)
ONLINE = ("ppo", "grpo", "rloo", "remax")  # Generate from prompts; the others read pairs / demonstrations.


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One RLHF role's network (or rule).

  preset: a `real_jax.models` preset name ("tiny", "7b", ...).
  overrides: ModelConfig field overrides, e.g. {"dtype": "bfloat16", "n_layers": 4}.
  head: "lm" (actor, ref) or "scalar" (critic, reward).
  init: "random", "hf:<dir>" (a HF checkpoint), or "copy:<role>" (the same initial weights as
    another role, e.g. the reference starts as the actor).
  rule: a rule-based reward on decoded text instead of a network, only for the reward role: "task"
    (the built-in task's own reward) or a registered `real_jax.data` reward ("exact_match",
    "char_overlap", ...; see `real_jax.data.list_rewards()`), which compares with the answer field.
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
  """Where the data comes from: a built-in task, or a JSON-lines file.

  task: built-in synthetic task ("reversal", "sorting", "arithmetic", "copy"), or "" for a file. For
    DPO / reward models the task's pairs are (correct answer, corrupted answer); for SFT its
    demonstrations.
  task_kwargs: e.g. {"difficulty": 2}.
  path: a JSON-lines file (used when set; then `task` is ignored). Field names: prompt_key,
    answer_key ("" = no answer; rule rewards such as exact_match need one), chosen_key and
    rejected_key (preference pairs: DPO, rm), completion_key (SFT).
  tokenizer: a `tokenizer.json` (file or directory), or "" for the built-in character tokenizer.
  batch_size: prompts (or pairs, or demonstrations) per iteration.
  max_prompt_len / max_response_len (0 = unlimited): longer sequences are handled per on_long
    ("truncate" keeps a prompt's last tokens and a response's first, "reject" fails with
    file:line, "skip").
  on_error: "raise" (a malformed line stops with file:line) or "skip" (skipped and counted).
  """

  task: str = "reversal"
  task_kwargs: dict = dataclasses.field(default_factory=dict)
  path: str = ""
  prompt_key: str = "prompt"
  answer_key: str = ""
  chosen_key: str = "chosen"
  rejected_key: str = "rejected"
  completion_key: str = "completion"
  tokenizer: str = ""
  batch_size: int = 16
  max_prompt_len: int = 32
  max_response_len: int = 0
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
  """Sampling of the generate calls; ignore_eos: always generate max_new_tokens (EOS does not end a
  response; throughput benchmarks force full-length responses this way)."""

  max_new_tokens: int = 16
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  n_samples: int = 1
  ignore_eos: bool = False


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A whole run.

  algorithm: one of ALGORITHMS; its section (ppo, grpo, rloo, remax, dpo) holds its hyperparameters.
  num_iterations: RLHF iterations to run. checkpoint_every: checkpoint period (iterations).
  sft_warmup_steps: supervised steps on task demonstrations before RL or DPO (built-in tasks only),
    so a tiny random model starts from a policy that produces answers of the right shape (the
    reference, `init="copy:actor"`, copies the warmed-up actor).
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
  grpo: GRPOConfig = GRPOConfig()
  rloo: RLOOConfig = RLOOConfig()
  remax: ReMaxConfig = ReMaxConfig()
  dpo: DPOConfig = DPOConfig()
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
  if exp.data.path and not os.path.isfile(exp.data.path):
    raise ConfigError(f"config.data.path={exp.data.path!r}: no such file")
  algo = exp.algorithm
  roles, trained = ROLES[algo]
  n = exp.sampling.n_samples
  rows = exp.data.batch_size * n
  if n < 1:
    raise ConfigError(f"config.sampling.n_samples={n} must be >= 1")
  if algo in ("grpo", "rloo") and getattr(exp, algo).group_size != n:
    raise ConfigError(f"config.{algo}.group_size={getattr(exp, algo).group_size} must equal "
                      f"config.sampling.n_samples={n} (the samples per prompt form the group)")
  mini = {"ppo": exp.ppo.mini_batches, "grpo": exp.grpo.mini_batches}.get(algo, 1)
  if rows % mini:
    raise ConfigError(f"config.{algo}.mini_batches={mini} does not divide the rows per iteration "
                      f"(config.data.batch_size x config.sampling.n_samples = {rows})")
  if algo not in ONLINE and n != 1:
    raise ConfigError(f"config.sampling.n_samples={n}: {algo} is offline (reads its data) and needs 1")
  for role in roles:
    if role not in exp.models:
      raise ConfigError(f"config.models.{role}: {algo} needs a model for role {role!r}")
  for role, spec in exp.models.items():
    if spec.rule and role != "reward":
      raise ConfigError(f"config.models.{role}.rule: only the reward role may be rule-based")
    if spec.init.startswith("copy:") and spec.init[5:] not in exp.models:
      raise ConfigError(f"config.models.{role}.init={spec.init!r}: no role {spec.init[5:]!r}")
    try:
      spec.model_config()
    except ValueError as e:
      raise ConfigError(f"config.models.{role}: {e}") from None
  want_head = {"actor": "lm", "ref": "lm", "critic": "scalar", "reward": "scalar"}
  for role in roles:
    spec = exp.models[role]
    if not spec.rule and role in want_head and spec.head != want_head[role]:
      raise ConfigError(f"config.models.{role}.head={spec.head!r}: {algo} needs a {want_head[role]!r} head")
  reward = exp.models.get("reward")
  if reward is not None and reward.rule and "reward" in roles:
    if algo == "rm":
      raise ConfigError(f"config.models.reward.rule={reward.rule!r}: rm trains a reward network; set rule=''")
    _check_rule(reward.rule, exp.data)
  for role in trained:
    if role not in exp.optim:
      raise ConfigError(f"config.optim.{role}: a trained role needs optimizer settings")
  if exp.sft_warmup_steps:
    if not exp.data.task or exp.data.path:
      raise ConfigError("config.sft_warmup_steps: the warm-up uses a built-in task's demonstrations; set "
                        "config.data.task (and no data.path) or sft_warmup_steps=0")
    if "actor" not in roles:
      raise ConfigError(f"config.sft_warmup_steps: {algo} has no actor to warm up; set it to 0")
  if not exp.data.path:
    try:
      get_task(exp.data.task, **dict(exp.data.task_kwargs))
    except (KeyError, TypeError, ValueError) as e:
      raise ConfigError(f"config.data.task={exp.data.task!r}: {e}") from None
  return exp


def _check_rule(rule: str, data: DataSpec) -> None:
  if rule == "task":
    if data.path or not data.task:
      raise ConfigError("config.models.reward.rule='task' needs a built-in config.data.task; for a JSON-lines "
                        "file name a registered reward, e.g. 'exact_match' (with config.data.answer_key)")
    return
  if rule not in list_rewards():
    raise ConfigError(f"config.models.reward.rule={rule!r}: expected 'task' or one of {list_rewards()}")
  if data.path and not data.answer_key:
    raise ConfigError(f"config.models.reward.rule={rule!r} compares with the answer: set config.data.answer_key")

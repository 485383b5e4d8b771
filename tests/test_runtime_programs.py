"""Every algorithm program runs end to end; JSON-lines data, host offload, config and plan errors, big configs."""

import json
import os
import sys

import jax
import numpy as np
import pytest

from real_jax.config import ConfigError
from real_jax.experiment import experiment_from_config
from real_jax.runtime import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import dpo_tiny  # noqa: E402
import grpo_tiny  # noqa: E402
import ppo_tiny  # noqa: E402
import remax_tiny  # noqa: E402
import rloo_tiny  # noqa: E402
import rm_tiny  # noqa: E402
import sft_tiny  # noqa: E402

CONFIGS = {"ppo": ppo_tiny, "grpo": grpo_tiny, "remax": remax_tiny, "rloo": rloo_tiny, "dpo": dpo_tiny,
           "sft": sft_tiny, "rm": rm_tiny}
QUIET = dict(log=lambda *_: None)


def small(name, arg=None, **over):
  c = CONFIGS[name].get_config(arg)
  c.num_iterations = 2
  if "sft_warmup_steps" in c:
    c.sft_warmup_steps = 0
  if c.data.task:
    c.data.batch_size = 16 if name in ("ppo", "remax", "dpo", "sft", "rm") else 8
  c.sampling.max_new_tokens = 4
  for k, v in over.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    with node.ignore_type():
      node[last] = v
  return c


CALLS = {
    "grpo": ["actor_gen", "reward_inf", "ref_inf", "actor_train"],
    "rloo": ["actor_gen", "reward_inf", "ref_inf", "actor_train"],
    "remax": ["actor_gen", "reward_inf", "ref_inf", "actor_greedy", "reward_greedy_inf", "actor_train"],
    "dpo": ["ref_inf", "actor_train"],
    "sft": ["actor_train"],
    "rm": ["reward_train"],
}
HEADLINE = {"grpo": "reward", "rloo": "reward", "remax": "reward", "dpo": "margin", "sft": "nll", "rm": "accuracy"}


@pytest.mark.parametrize("name", ["rloo", "sft"])  # grpo, remax, dpo and rm run in test_runtime_learning.py.
def test_program_runs_and_records_its_calls(name, tmp_path):
  rows = run(experiment_from_config(small(name)), str(tmp_path), **QUIET)
  assert [r["iteration"] for r in rows] == [0, 1]
  assert HEADLINE[name] in rows[0] and all(np.isfinite(r[HEADLINE[name]]) for r in rows)
  tl = [json.loads(x) for x in open(tmp_path / "timeline.jsonl")]
  assert [r["name"] for r in tl[1]["records"] if r["kind"] == "call"] == CALLS[name]
  assert all(f"time/call/{c}" in rows[1] for c in CALLS[name])


def test_offload_rests_frozen_models_in_host_memory(tmp_path):
  """plan offload=ref: the reference sits in pinned host memory between its calls (pinned_host works on
  the CPU backend too), comes back for ref_inf, and the run matches the same plan without offload."""
  seen = []

  def probe(it, metrics, state):
    slot = state.engine.slots["ref"]
    seen.append((slot.offloaded, {x.sharding.memory_kind for x in jax.tree.leaves(slot.params)}))

  exp = experiment_from_config(small("grpo"))
  base = run(exp, str(tmp_path / "a"), **QUIET)
  exp_off = experiment_from_config(small("grpo", plan="actor_gen=0:8/d1f8t1, reward_inf=0:8/d1f8t1, "
                                         "ref_inf=0:8/d1f8t1, actor_train=0:8/d1f8t1, offload=ref"))
  rows = run(exp_off, str(tmp_path / "b"), callbacks=[probe], **QUIET)
  assert seen == [(True, {"pinned_host"})] * 2
  for a, b in zip(base, rows):
    for k in ("reward", "kl", "actor/loss"):
      assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k


def _write_hf_tokenizer(path):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(["one two three four five six", "what is two plus three"],
                          trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
  tok.save(str(path))


def test_jsonl_prompts_with_hf_tokenizer_and_rule_reward(tmp_path):
  """Prompts from JSON lines with configurable field names, an HF tokenizer.json and exact_match."""
  _write_hf_tokenizer(tmp_path / "tokenizer.json")
  with open(tmp_path / "prompts.jsonl", "w") as f:
    for i in range(8):
      f.write(json.dumps({"question": "what is two plus three", "gold": "five"}) + "\n")
  c = small("grpo", **{"data.task": "", "data.path": str(tmp_path / "prompts.jsonl"), "data.prompt_key": "question",
                       "data.answer_key": "gold", "data.tokenizer": str(tmp_path / "tokenizer.json"),
                       "models.reward.rule": "exact_match"})
  c.num_iterations = 1
  rows = run(experiment_from_config(c), str(tmp_path / "wd"), **QUIET)
  assert 0.0 <= rows[0]["reward"] <= 1.0


@pytest.mark.parametrize("name", ["dpo", "rm", "sft"])
def test_offline_programs_read_jsonl_fixtures(name, tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  c = CONFIGS[name].get_config("data=file")
  c.num_iterations = 1
  rows = run(experiment_from_config(c), str(tmp_path), **QUIET)
  assert np.isfinite(rows[0][HEADLINE[name]])


@pytest.mark.parametrize("name, over, match", [
    ("grpo", {"grpo.group_size": 8}, r"config.grpo.group_size=8 must equal config.sampling.n_samples=4"),
    ("rloo", {"sampling.n_samples": 2}, r"config.rloo.group_size=4 must equal config.sampling.n_samples=2"),
    ("grpo", {"grpo.mini_batches": 3}, r"config.grpo.mini_batches=3 does not divide the rows per iteration"),
    ("grpo", {"grpo.beta": -1.0}, r"config.grpo: GRPOConfig.beta"),
    ("dpo", {"dpo.beta": 0.0}, r"config.dpo: DPOConfig.beta"),
    ("dpo", {"sampling.n_samples": 2}, r"config.sampling.n_samples=2: dpo is offline"),
    ("rm", {"models.reward.rule": "task"}, r"config.models.reward.rule='task': rm trains a reward network"),
    ("grpo", {"models.reward.rule": "nope"}, r"config.models.reward.rule='nope': expected 'task' or one of"),
    ("grpo", {"data.task": "", "data.path": "/no/such.jsonl"}, r"config.data.path='/no/such.jsonl': no such file"),
    ("remax", {"models.actor.head": "scalar"}, r"config.models.actor.head='scalar': remax needs a 'lm' head"),
    ("grpo", {"algorithm": "a2c"}, r"config: algorithm='a2c': expected one of"),
])
def test_program_config_errors_name_the_key(name, over, match):
  c = small(name, **over)
  with pytest.raises(ConfigError, match=match):
    experiment_from_config(c)


@pytest.mark.parametrize("name, plan, match", [
    ("remax", "actor_greedy=0:8/d1f8t1m4", r"call 'actor_greedy'.*batch 16 does not divide over"),
    ("grpo", "actor_train=0:8/d1f8t1m4", r"call 'actor_train'.*grpo mini-batch of 16 rows does not divide .* 32"),
    ("dpo", "ref_inf=0:8/d1f1t8", r"call 'ref_inf'.*'heads' of size 4 does not divide"),
    ("grpo", "offload=actor", r"offload names 'actor' .*which is trained"),
    ("grpo", "offload=critic", r"offload names 'critic', which is not a model of the graph \['actor', "),
])
def test_bad_plans_of_new_programs_fail_before_compiling(name, plan, match, tmp_path):
  calls = {c: "0:8/d1f8t1" for c in CALLS[name]}
  text = ", ".join(f"{c}={l}" for c, l in calls.items() if not plan.startswith(c + "=")) + ", " + plan
  with pytest.raises(ValueError, match=match):
    run(experiment_from_config(small(name, plan=text)), str(tmp_path), **QUIET)
  assert not os.path.exists(tmp_path / "metrics.jsonl")  # Nothing ran.


@pytest.mark.parametrize("size", ["7b", "13b", "34b", "70b"])
@pytest.mark.parametrize("arg", ["gen=128", "gen=384", "gen=896", "gen=384,plan=split"])
def test_llama_configs_build_valid_experiments(size, arg):
  import importlib
  mod = importlib.import_module(f"ppo_llama{size}")
  exp = experiment_from_config(mod.get_config(arg))
  assert exp.algorithm == "ppo" and exp.data.batch_size == 512 and exp.data.max_prompt_len == 128
  assert exp.sampling.max_new_tokens == int(arg.split(",")[0].split("=")[1])
  assert exp.models["actor"].model_config().n_layers == {"7b": 32, "13b": 40, "34b": 48, "70b": 80}[size]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_tiny_config_builds_and_has_the_top_level_keys(name):
  c = CONFIGS[name].get_config()
  assert {"num_iterations", "checkpoint_every"} <= set(c.keys())
  assert experiment_from_config(c).algorithm == name

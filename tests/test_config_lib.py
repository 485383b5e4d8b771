"""real_jax.config_lib: the config argument parser and the shared pieces of configs/*.py."""

import glob
import os

import pytest

from real_jax import config_lib as cl
from real_jax.experiment import experiment_from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_arg_defaults_and_values():
  assert cl.parse_arg(None, plan=("colocated", "split")) == {"plan": "colocated"}
  assert cl.parse_arg("", gen=("384", "128")) == {"gen": "384"}
  got = cl.parse_arg("gen=128, plan=split", gen=("384", "128"), plan=("colocated", "split"))
  assert got == {"gen": "128", "plan": "split"}


@pytest.mark.parametrize("arg, match", [
    ("plna=split", r"plna=split: unknown key; known: plan"),
    ("plan=spilt", r"plan=spilt: expected one of colocated, split"),
    ("split", r"'split': expected key=value"),
    ("=split", r"'=split': expected key=value"),
])
def test_parse_arg_names_what_is_wrong(arg, match):
  with pytest.raises(ValueError, match=match):
    cl.parse_arg(arg, plan=("colocated", "split"))


def test_model_and_optim_entries_are_independent_copies():
  a = cl.model("tiny", cl.TINY, head="lm")
  a["overrides"]["d_model"] = 1
  assert cl.TINY["d_model"] == 64 and cl.model("tiny", cl.TINY, head="lm")["overrides"]["d_model"] == 64
  assert cl.constant_optim(1e-3)["decay"] == "constant"
  assert cl.cosine_optim(1e-6, warmup_steps=5, decay_steps=10)["warmup_steps"] == 5


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))), ids=os.path.basename)
def test_every_config_file_loads_by_path_and_rejects_bad_arguments(path):
  """As ml_collections.config_flags loads them: by path, not as a package (so no sibling imports)."""
  name = os.path.basename(path)[:-3]
  mod = cl.load_sibling(path, name)
  exp = experiment_from_config(mod.get_config())
  assert exp.algorithm
  with pytest.raises(ValueError, match="nosuchkey=1: unknown key"):
    mod.get_config("nosuchkey=1")


def test_load_sibling_names_a_missing_file():
  with pytest.raises(FileNotFoundError, match="no config .*nope.py"):
    cl.load_sibling(os.path.join(ROOT, "configs", "ppo_tiny.py"), "nope")


def test_parse_arg_typed_values():
  got = cl.parse_arg("gen=1024", models=("1.3b", "7b"), gen=int, batch=int)
  assert got == {"models": "1.3b", "gen": 1024, "batch": None}
  with pytest.raises(ValueError, match="gen=lots: not a valid int"):
    cl.parse_arg("gen=lots", gen=int)

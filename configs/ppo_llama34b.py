r"""PPO with LLaMA-34B-shaped models on 32 GPUs (4 nodes of 8), otherwise as configs/ppo_llama7b.py.

    python -m real_jax.train --config configs/ppo_llama34b.py:gen=384 --workdir /tmp/ppo_34b

Presets as ppo_llama7b: gen=128|384|896, plan=colocated|split. Multi-host: every process runs this same
command after `jax.distributed.initialize` (DESIGN.md section 7).
"""

import importlib.util
import os


def _llama7b():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ppo_llama7b.py")
  spec = importlib.util.spec_from_file_location("ppo_llama7b", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  return _llama7b().llama_ppo(arg, preset="34b", devices=32)

r"""PPO with LLaMA-70B-shaped models on 64 GPUs (8 nodes of 8), otherwise as configs/ppo_llama7b.py.

    python -m real_jax.train --config configs/ppo_llama70b.py:gen=384 --workdir /tmp/ppo_70b

Presets as ppo_llama7b: gen=128|384|896, plan=colocated|split. Multi-host: every process runs this same
command after `jax.distributed.initialize` (DESIGN.md section 7).
"""

from real_jax import config_lib as cl


def get_config(arg=None):
  return cl.load_sibling(__file__, "ppo_llama7b").llama_ppo(arg, preset="70b", devices=64)

r"""PPO with LLaMA-34B-shaped models on 32 GPUs (4 nodes of 8), otherwise as configs/ppo_llama7b.py.

    python -m real_jax.train --config configs/ppo_llama34b.py:gen=384 --workdir /tmp/ppo_34b

Presets as ppo_llama7b: gen=128|384|896, plan=colocated|split. Multi-host: every process runs this same
command after `jax.distributed.initialize` (DESIGN.md section 7).
"""

from real_jax import config_lib as cl


def get_config(arg=None):
  return cl.load_sibling(__file__, "ppo_llama7b").llama_ppo(arg, preset="34b", devices=32)

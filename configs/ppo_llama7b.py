r"""PPO with LLaMA-7B-shaped models on one 8-GPU node: the ReaL paper's single-node setting.

    python -m real_jax.train --config configs/ppo_llama7b.py:gen=384 --workdir /tmp/ppo_7b \
        --config.data.path=prompts.jsonl --config.data.tokenizer=/path/to/tokenizer.json

Actor and reference: LLaMA-2-7B shape (bf16 compute, fp32 masters); critic and reward: the same shape with
a scalar head. 512 prompts per iteration, prompts of up to 128 tokens, responses of 128 / 384 / 896 tokens
(preset `gen=`). The reward is a learned model: point `models.reward.init` at an `hf:<dir>` export (e.g.
from an `rm` run); without weights it runs with a random reward, which measures throughput, not learning.
Presets (`:key=value,...`): gen=128|384|896; plan=colocated|split (split: actor generation with tensor
parallelism on all 8 GPUs, actor training fsdp on 0-3, critic on 4-7, ref/reward inference d4 / d4).

configs/ppo_llama{13b,34b,70b}.py reuse `llama_ppo` with larger models and more devices.
"""

import ml_collections

from real_jax import config_lib as cl


def llama_ppo(arg, *, preset="7b", devices=8):
  """The shared body of the ppo_llama* configs: `preset` models on `devices` GPUs."""
  args = cl.parse_arg(arg, gen=("384", "128", "896"), plan=("colocated", "split"))
  gen = int(args["gen"])
  c = ml_collections.ConfigDict()
  c.algorithm = "ppo"
  c.seed = 0
  c.num_iterations = 20            # RLHF iterations (the paper times a handful after warm-up).
  c.checkpoint_every = 10          # Checkpoint period in iterations.
  c.sft_warmup_steps = 0           # Start from pretrained / SFT weights (models.*.init = "hf:<dir>").
  c.log_every = 1

  big = dict(dtype="bfloat16", param_dtype="float32", max_seq_len=128 + gen, remat="full")
  c.models = ml_collections.ConfigDict()
  c.models.actor = cl.model(preset, big, head="lm")
  c.models.ref = cl.model(preset, big, head="lm", init="copy:actor")
  c.models.critic = cl.model(preset, big, head="scalar", seed=1)
  c.models.reward = cl.model(preset, big, head="scalar", seed=2)

  c.optim = ml_collections.ConfigDict()
  c.optim.actor = cl.cosine_optim(1e-6, warmup_steps=5, decay_steps=1000)
  c.optim.critic = cl.cosine_optim(5e-6, warmup_steps=5, decay_steps=1000)

  # 512 prompts of up to 128 tokens: a JSON-lines file with an HF tokenizer (override path/tokenizer), or the
  # built-in arithmetic task with the character tokenizer as a stand-in.
  c.data = dict(task="arithmetic", task_kwargs={"difficulty": 3}, path="", prompt_key="prompt", answer_key="",
                tokenizer="", batch_size=512, max_prompt_len=128, on_long="truncate")
  c.sampling = dict(max_new_tokens=gen, temperature=1.0, top_k=0, top_p=1.0, n_samples=1)
  c.ppo = dict(gamma=1.0, lam=0.95, clip_eps=0.2, kl_coef=0.1, kl_in_reward=True, whiten_advantages=True,
               ppo_epochs=1, mini_batches=4, value_clip_eps=0.2)

  half = devices // 2
  plans = {
      "colocated": "colocated",
      "split": (f"actor_gen=0:{devices}/d{devices // 8 * 2}f1t4, actor_train=0:{half}/d1f{half}t1, "
                f"critic_inf={half}:{half}/d1f{half}t1, critic_train={half}:{half}/d1f{half}t1, "
                f"ref_inf=0:{half}/d{half}f1t1, reward_inf={half}:{half}/d{half}f1t1"),
  }
  c.plan = plans[args["plan"]]
  c.colocated_strategy = f"d1f{devices}t1"
  return c


def get_config(arg=None):
  return llama_ppo(arg, preset="7b", devices=8)

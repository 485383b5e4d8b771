r"""RLOO on the synthetic string-reversal task with tiny models (CPU, 8 fake devices).

    python -m real_jax.train --config configs/rloo_tiny.py --workdir /tmp/rloo_tiny

Four calls: actor_gen (n = 4 samples per prompt, rows group-major) -> {reward_inf (the task's rule on
decoded text), ref_inf} -> actor_train (REINFORCE, baseline: the mean of the prompt's other samples; each
sample's reward first loses kl_coef x its summed KL to the reference). No critic. Presets: plan=colocated|split (split: the actor on devices
0-3, generating with data x tensor and training with fsdp, the reference on 4-7).
"""

import ml_collections

from real_jax import config_lib as cl

def get_config(arg=None):
  args = cl.parse_arg(arg, plan=("colocated", "split"))
  c = ml_collections.ConfigDict()
  c.algorithm = "rloo"
  c.seed = 0
  c.num_iterations = 40            # RLHF iterations.
  c.checkpoint_every = 0           # Checkpoint period in iterations (0: only at the end, once checkpoints land).
  c.sft_warmup_steps = 80          # Supervised warm-up of the actor on task demonstrations (the ref copies it).
  c.sft_learning_rate = 3e-3
  c.log_every = 1

  c.models = ml_collections.ConfigDict()
  c.models.actor = cl.model("tiny", cl.TINY, head="lm")
  c.models.ref = cl.model("tiny", cl.TINY, head="lm", init="copy:actor")
  c.models.reward = cl.model("tiny", cl.TINY, head="scalar", rule="task", seed=2)

  c.optim = ml_collections.ConfigDict()
  c.optim.actor = cl.constant_optim(1e-3)

  c.data = dict(task="reversal", task_kwargs={"difficulty": 1}, batch_size=16, max_prompt_len=32)
  c.sampling = dict(max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0, n_samples=4)  # n = group size.
  c.rloo = dict(group_size=4, kl_coef=0.05, kl_estimator="k1", loss_agg="token_mean")

  plans = {
      "colocated": "colocated",
      "split": "actor_gen=0:4/d2f1t2, actor_train=0:4/d1f4t1, reward_inf=4:1/d1f1t1, ref_inf=4:4/d4f1t1",
  }
  c.plan = plans[args["plan"]]
  c.colocated_strategy = "d1f8t1"
  return c

r"""GRPO on the synthetic string-reversal task with tiny models (CPU, 8 fake devices).

    python -m real_jax.train --config configs/grpo_tiny.py --workdir /tmp/grpo_tiny

Four calls: actor_gen (n = 4 samples per prompt, rows group-major) -> {reward_inf (the task's rule on
decoded text), ref_inf} -> actor_train (group-normalised advantages, clipped loss, k3 KL to the
reference). No critic. Presets: plan=colocated|split (split: the actor on devices 0-3, generating with
data x tensor and training with fsdp, the reference on 4-7).
"""

import ml_collections

from real_jax import config_lib as cl

def get_config(arg=None):
  args = cl.parse_arg(arg, plan=("colocated", "split"))
  c = ml_collections.ConfigDict()
  c.algorithm = "grpo"
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
  c.grpo = dict(group_size=4, scale_by_std=True, clip_eps=0.2, beta=0.02, kl_estimator="k3",
                loss_agg="seq_mean_token_mean", ppo_epochs=1, mini_batches=2)

  plans = {
      "colocated": "colocated",
      "split": "actor_gen=0:4/d2f1t2, actor_train=0:4/d1f4t1, reward_inf=4:1/d1f1t1, ref_inf=4:4/d4f1t1",
  }
  c.plan = plans[args["plan"]]
  c.colocated_strategy = "d1f8t1"
  return c

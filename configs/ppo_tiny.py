r"""PPO on a synthetic string-reversal task with tiny models: the embedded default (CPU, 8 fake devices).

    python -m real_jax.train --config configs/ppo_tiny.py --workdir /tmp/ppo_tiny
    python -m real_jax.train --config configs/ppo_tiny.py:plan=split --workdir /tmp/ppo_tiny_split

Presets (`:key=value,...`): plan=colocated|split (split: actor generation (data x tensor) and training (fsdp) on
devices 0-3, critic/ref/reward on 4-7: the actor is reallocated between its calls every iteration). Any key can be overridden with
`--config.key=value`, e.g. `--config.num_iterations=50`.
"""

import ml_collections

from real_jax import config_lib as cl


def get_config(arg=None):
  args = cl.parse_arg(arg, plan=("colocated", "split"))
  c = ml_collections.ConfigDict()
  c.algorithm = "ppo"
  c.seed = 0
  c.num_iterations = 50            # RLHF iterations.
  c.checkpoint_every = 0           # Checkpoint period in iterations (0: only at the end, once checkpoints land).
  c.sft_warmup_steps = 80          # Supervised warm-up of the actor on task demonstrations.
  c.sft_learning_rate = 3e-3
  c.log_every = 1

  c.models = ml_collections.ConfigDict()
  c.models.actor = cl.model("tiny", cl.TINY, head="lm")
  c.models.ref = cl.model("tiny", cl.TINY, head="lm", init="copy:actor")
  c.models.critic = cl.model("tiny", cl.TINY, head="scalar", seed=1)
  c.models.reward = cl.model("tiny", cl.TINY, head="scalar", rule="task", seed=2)

  c.optim = ml_collections.ConfigDict()
  c.optim.actor = cl.constant_optim(1e-3)
  c.optim.critic = cl.constant_optim(1e-3)

  c.data = dict(task="reversal", task_kwargs={"difficulty": 1}, batch_size=64, max_prompt_len=32)
  c.sampling = dict(max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0, n_samples=1)
  c.ppo = dict(gamma=1.0, lam=0.95, clip_eps=0.2, kl_coef=0.02, kl_in_reward=True, whiten_advantages=True,
               ppo_epochs=2, mini_batches=2, value_clip_eps=0.2)

  plans = {
      "colocated": "colocated",
      "split": ("actor_gen=0:4/d2f1t2, actor_train=0:4/d1f4t1, reward_inf=4:1/d1f1t1, ref_inf=4:4/d4f1t1, "
                "critic_inf=4:4/d1f2t2, critic_train=4:4/d1f2t2"),
  }
  c.plan = plans[args["plan"]]
  c.colocated_strategy = "d1f8t1"
  return c

r"""Reward-model training (pairwise Bradley-Terry) on pairs derived from the synthetic sorting task (CPU).

    python -m real_jax.train --config configs/rm_tiny.py --workdir /tmp/rm_tiny
    python -m real_jax.train --config configs/rm_tiny.py:data=file --workdir /tmp/rm_file

One call, reward_train: the scalar head's score at each sequence's last token, chosen versus rejected.
Pairs: chosen = the sorted digits, rejected = the same digits shuffled (no download). `accuracy` is measured
on each new (never seen) batch before its step: held-out accuracy. Presets: data=task|file (file:
tests/fixtures/data/preferences.jsonl).
"""

import ml_collections

from real_jax import config_lib as cl

def get_config(arg=None):
  args = cl.parse_arg(arg, data=("task", "file"))
  c = ml_collections.ConfigDict()
  c.algorithm = "rm"
  c.seed = 0
  c.num_iterations = 60            # Train steps (one batch of pairs each).
  c.checkpoint_every = 0           # Checkpoint period in iterations (0: only at the end, once checkpoints land).
  c.log_every = 10

  c.models = ml_collections.ConfigDict()
  c.models.reward = cl.model("tiny", cl.TINY, head="scalar", seed=2)

  c.optim = ml_collections.ConfigDict()
  c.optim.reward = cl.constant_optim(1e-3)

  data = {
      "task": dict(task="sorting", task_kwargs={"difficulty": 1}, batch_size=32, max_prompt_len=32),
      "file": dict(task="", path="tests/fixtures/data/preferences.jsonl", prompt_key="prompt", chosen_key="chosen",
                   rejected_key="rejected", tokenizer="", batch_size=4, max_prompt_len=32, max_response_len=16),
  }
  c.data = data[args["data"]]
  c.sampling = dict(max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0, n_samples=1)  # Unused.
  c.plan = "colocated"
  c.colocated_strategy = "d1f8t1" if args["data"] == "task" else "d1f4t2"  # File: 4 pairs.
  return c

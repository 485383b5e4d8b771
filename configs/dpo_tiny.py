r"""DPO on preference pairs derived from the synthetic sorting task, tiny models (CPU, 8 fake devices).

    python -m real_jax.train --config configs/dpo_tiny.py --workdir /tmp/dpo_tiny
    python -m real_jax.train --config configs/dpo_tiny.py:data=file --workdir /tmp/dpo_file

Two calls: ref_inf (the frozen reference's sequence log-probs of chosen and rejected) -> actor_train. The
pairs need no download: chosen = the task's answer, rejected = a corrupted answer (shuffled digits). The
actor is warmed up with SFT on demonstrations first and the reference copies it, as in practice.
Watch `margin`, the mean chosen-minus-rejected log-ratio, measured on each new batch before its step.
Presets: data=task|file (file: tests/fixtures/data/preferences.jsonl, fields prompt/chosen/rejected);
plan=colocated|split (split: reference on devices 4-7 while the actor trains on 0-3).
"""

import ml_collections

from real_jax import config_lib as cl

def get_config(arg=None):
  args = cl.parse_arg(arg, plan=("colocated", "split"), data=("task", "file"))
  c = ml_collections.ConfigDict()
  c.algorithm = "dpo"
  c.seed = 0
  c.num_iterations = 30            # Train steps (one batch of pairs each).
  c.checkpoint_every = 0           # Checkpoint period in iterations (0: only at the end, once checkpoints land).
  c.sft_warmup_steps = 40          # Supervised warm-up of the actor on task demonstrations (the ref copies it).
  c.sft_learning_rate = 3e-3
  c.log_every = 5

  c.models = ml_collections.ConfigDict()
  c.models.actor = cl.model("tiny", cl.TINY, head="lm")
  c.models.ref = cl.model("tiny", cl.TINY, head="lm", init="copy:actor")

  c.optim = ml_collections.ConfigDict()
  c.optim.actor = cl.constant_optim(1e-3)

  data = {
      "task": dict(task="sorting", task_kwargs={"difficulty": 1}, batch_size=32, max_prompt_len=32),
      "file": dict(task="", path="tests/fixtures/data/preferences.jsonl", prompt_key="prompt", chosen_key="chosen",
                   rejected_key="rejected", tokenizer="", batch_size=4, max_prompt_len=32, max_response_len=16),
  }
  c.data = data[args["data"]]
  if args["data"] == "file":
    c.sft_warmup_steps = 0  # The warm-up needs a built-in task.
  c.sampling = dict(max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0, n_samples=1)  # Unused by DPO.
  c.dpo = dict(beta=0.1, label_smoothing=0.0, loss_type="dpo_sigmoid")

  plans = {
      "colocated": "colocated",
      "split": "ref_inf=4:4/d4f1t1, actor_train=0:4/d1f4t1",
  }
  c.plan = plans[args["plan"]]
  c.colocated_strategy = "d1f8t1" if args["data"] == "task" else "d1f4t2"  # File: 4 pairs.
  return c

r"""Supervised fine-tuning on the synthetic string-reversal task's demonstrations (CPU, 8 fake devices).

    python -m real_jax.train --config configs/sft_tiny.py --workdir /tmp/sft_tiny
    python -m real_jax.train --config configs/sft_tiny.py:data=file --workdir /tmp/sft_file

One call, actor_train, on (prompt, completion) batches; the loss is the completion's token NLL. Presets:
data=task|file (file: tests/fixtures/data/sft.jsonl, fields prompt/completion, character tokenizer).
"""

import ml_collections

from real_jax import config_lib as cl

def get_config(arg=None):
  args = cl.parse_arg(arg, data=("task", "file"))
  c = ml_collections.ConfigDict()
  c.algorithm = "sft"
  c.seed = 0
  c.num_iterations = 100           # Train steps (one batch each).
  c.checkpoint_every = 0           # Checkpoint period in iterations (0: only at the end, once checkpoints land).
  c.log_every = 10

  c.models = ml_collections.ConfigDict()
  c.models.actor = cl.model("tiny", cl.TINY, head="lm")

  c.optim = ml_collections.ConfigDict()
  c.optim.actor = cl.constant_optim(3e-3)

  data = {
      "task": dict(task="reversal", task_kwargs={"difficulty": 1}, batch_size=64, max_prompt_len=32),
      # Fields prompt / completion; tokenizer "" = the character tokenizer (or a tokenizer.json path).
      "file": dict(task="", path="tests/fixtures/data/sft.jsonl", prompt_key="prompt", completion_key="completion",
                   tokenizer="", batch_size=4, max_prompt_len=32, max_response_len=16),
  }
  c.data = data[args["data"]]
  c.sampling = dict(max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0, n_samples=1)  # Unused by SFT.
  c.plan = "colocated"
  c.colocated_strategy = "d1f8t1" if args["data"] == "task" else "d1f4t2"  # File: 4 rows.
  return c

"""The loop's data side: the tokenizer, the batch iterator of a program's data kind, and its arrays.

`config.data` names a built-in task (with the built-in character tokenizer) or a JSON-lines file
(`path`, field names `prompt_key` / `answer_key` / `chosen_key` / `rejected_key` / `completion_key`,
and `tokenizer`: a `tokenizer.json` path, or "" for the character tokenizer). Per data kind:

  prompts      `PromptDataset` / `TaskDataset`  -> `prompts`, `prompt_mask` (left-padded)
  preferences  `PreferenceDataset` / `TaskPreferenceDataset` -> PREFERENCE_KEYS (right-padded)
  sft          `SFTDataset` / `TaskSFTDataset`  -> SFT_KEYS (right-padded)

`TaskPreferenceDataset` derives preference pairs from a built-in task, so DPO and reward-model runs
need no download: chosen = the correct answer, rejected = a corrupted one (its characters shuffled
when that changes it, else one character replaced).
"""

from __future__ import annotations

import numpy as np

from real_jax.data import (CharTokenizer, HFTokenizer, PreferenceDataset, PreferenceRecord, PromptDataset,
                           SFTDataset, TaskDataset, TaskSFTDataset, encode_response, get_task, preference_batches,
                           prompt_batches, sft_batches)


def make_tokenizer(data):
  """The character tokenizer, or an HF `tokenizer.json` (config.data.tokenizer)."""
  if not data.tokenizer:
    return CharTokenizer()
  try:
    return HFTokenizer.from_file(data.tokenizer)
  except (OSError, ValueError) as e:
    raise ValueError(f"config.data.tokenizer={data.tokenizer!r}: {e}") from None


def corrupt(answer: str, rng: np.random.Generator, alphabet: str) -> str:
  """A wrong answer: `answer` shuffled when that changes it, else one character replaced (or one added)."""
  if len(set(answer)) > 1:
    while True:
      s = "".join(rng.permutation(list(answer)))
      if s != answer:
        return s
  pool = [c for c in alphabet if c not in answer] or list(alphabet)
  if not answer:
    return str(rng.choice(pool))
  i = int(rng.integers(len(answer)))
  return answer[:i] + str(rng.choice(pool)) + answer[i + 1:]


class TaskPreferenceDataset(TaskSFTDataset):
  """`PreferenceRecord`s from a built-in task: chosen = the answer, rejected = `corrupt(answer)`.

  The corruption draws from the answer's own character class (digits for arithmetic and sorting,
  letters otherwise), seeded by (seed, index), so the pairs are deterministic and random-access.
  """

  def __getitem__(self, index: int) -> PreferenceRecord:
    demo = super().__getitem__(index)
    answer = demo.completion
    alphabet = "0123456789" if answer.lstrip("-").isdigit() else "abcdefghijklmnopqrstuvwxyz"
    rejected = corrupt(answer, np.random.default_rng([self.seed, int(index), 7]), alphabet)
    r_ids, _ = encode_response(self.tokenizer, rejected)
    return PreferenceRecord(demo.prompt, answer, rejected, demo.prompt_ids, demo.completion_ids, r_ids)


def make_batches(exp, tok, kind: str, *, seed_offset: int = 0):
  """The resumable batch iterator of data kind `kind` ("prompts", "preferences" or "sft")."""
  d = exp.data
  seed = exp.seed + seed_offset
  common = dict(max_prompt_len=d.max_prompt_len, on_long=d.on_long, on_error=d.on_error)
  if d.path:
    if kind == "prompts":
      ds = PromptDataset(d.path, tok, prompt_key=d.prompt_key, answer_key=d.answer_key or None, **common)
    elif kind == "preferences":
      ds = PreferenceDataset(d.path, tok, prompt_key=d.prompt_key, chosen_key=d.chosen_key,
                             rejected_key=d.rejected_key, max_response_len=d.max_response_len or None, **common)
    else:
      ds = SFTDataset(d.path, tok, prompt_key=d.prompt_key, completion_key=d.completion_key,
                      max_response_len=d.max_response_len or None, **common)
  else:
    task = get_task(d.task, **dict(d.task_kwargs))
    cls = {"prompts": TaskDataset, "preferences": TaskPreferenceDataset, "sft": TaskSFTDataset}[kind]
    ds = cls(task, tok, seed=seed, size=None)
  batches = {"prompts": prompt_batches, "preferences": preference_batches, "sft": sft_batches}[kind]
  return batches(ds, d.batch_size, seed=seed)


def batch_arrays(kind: str, batch) -> tuple[dict[str, np.ndarray], dict]:
  """(external arrays of the graph, per-prompt host data for rule rewards) of one batch."""
  if kind == "prompts":
    arrays = {"prompts": batch.tokens_BT.astype(np.int32), "prompt_mask": batch.mask_BT}
    return arrays, {"prompts": list(batch.prompts), "answers": list(batch.answers)}
  if kind == "preferences":
    arrays = {}
    for side in ("chosen", "rejected"):
      arrays[f"{side}_tokens"] = getattr(batch, f"{side}_tokens_BT").astype(np.int32)
      arrays[f"{side}_mask"] = getattr(batch, f"{side}_mask_BT")
      arrays[f"{side}_loss_mask"] = getattr(batch, f"{side}_loss_mask_BT")
    return arrays, {"prompts": list(batch.prompts)}
  return ({"tokens": batch.tokens_BT.astype(np.int32), "mask": batch.mask_BT, "loss_mask": batch.loss_mask_BT},
          {"prompts": list(batch.prompts)})

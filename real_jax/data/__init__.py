"""Data for RLHF: tokenizers, synthetic verifiable tasks, rule-based rewards, JSONL datasets, resumable batching.

  tokenizers  `Tokenizer` protocol; `CharTokenizer` (synthetic tasks, <= 64 ids); `HFTokenizer` (tokenizer.json).
  tasks       `get_task("arithmetic" | "sorting" | "reversal" | "copy", difficulty=...)`; `TaskDataset` (RL
              prompts with answers), `TaskSFTDataset` (demonstrations); `task.reward(prompt, response, answer)`.
  rewards     `register_reward`, `get_reward(name, **params)`; exact_match, char_overlap, length_penalty;
              `decode_responses` / `score_responses` for generated token arrays.
  datasets    `PromptDataset`, `PreferenceDataset`, `SFTDataset` from JSON lines; `DataError` names file:line.
  batching    `prompt_batches` (left-padded), `preference_batches` / `sft_batches` (right-padded), bucketed
              lengths, `BatchIterator.state()` / `.restore()`.

Shape suffixes: B batch, T tokens. See each module's docstring for the exact rules. Typical use:

  tok = CharTokenizer()
  prompts = prompt_batches(TaskDataset("arithmetic", tok, seed=0), batch_size=8, seed=0)
  batch = next(prompts)                       # batch.tokens_BT int32 [8, 16] left-padded, batch.mask_BT bool
  ...                                         # generate response_BT from batch.tokens_BT / batch.mask_BT
  rewards_B = score_responses(get_task("arithmetic").reward, tok, batch.prompts, response_BT, batch.answers)
  checkpoint["data"] = prompts.state()        # later: prompts.restore(checkpoint["data"])
"""

from real_jax.data.batching import (BatchIterator, PreferenceBatch, PromptBatch, SFTBatch, bucket_length,
                                    collate_preferences, collate_prompts, collate_sft, pad_sequences,
                                    preference_batches, prompt_batches, sft_batches)
from real_jax.data.datasets import (DataError, PreferenceDataset, PreferenceRecord, PromptDataset, PromptRecord,
                                    SFTDataset, SFTRecord, encode_prompt, encode_response)
from real_jax.data.rewards import (RewardFn, combine_rewards, decode_responses, get_reward, list_rewards,
                                   register_reward, score_responses)
from real_jax.data.tasks import Example, Task, TaskDataset, TaskSFTDataset, get_task, list_tasks, register_task
from real_jax.data.tokenizers import CHAR_ALPHABET, CharTokenizer, HFTokenizer, Tokenizer

__all__ = [
    "BatchIterator", "CHAR_ALPHABET", "CharTokenizer", "DataError", "Example", "HFTokenizer", "PreferenceBatch",
    "PreferenceDataset", "PreferenceRecord", "PromptBatch", "PromptDataset", "PromptRecord", "RewardFn", "SFTBatch",
    "SFTDataset", "SFTRecord", "Task", "TaskDataset", "TaskSFTDataset", "Tokenizer", "bucket_length",
    "collate_preferences", "collate_prompts", "collate_sft", "combine_rewards", "decode_responses", "encode_prompt",
    "encode_response", "get_reward",
    "get_task", "list_rewards", "list_tasks", "pad_sequences", "preference_batches", "prompt_batches",
    "register_reward", "register_task", "score_responses", "sft_batches",
]

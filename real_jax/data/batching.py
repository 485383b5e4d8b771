"""Deterministic, resumable batch iterators with bucketed padding.

`BatchIterator` walks a dataset (any object with `__getitem__` and `size`: an int, or None for an infinite task
stream) in batches of `batch_size` records. A finite dataset is reshuffled every epoch with the permutation
`np.random.default_rng([seed, epoch]).permutation(size)`; the last incomplete batch of an epoch is dropped so
shapes stay few (`size < batch_size` fails at construction). An infinite dataset is read in index order
(its examples are already random). `state()` is a small JSON-serialisable dict, `restore(state)` continues with
exactly the batches an uninterrupted iterator would have produced.

Sequence length T is a bucket: the smallest entry of `buckets` that holds the longest sequence of the batch
(default: powers of two, at least 16), so jitted steps see a handful of shapes. Batches hold NumPy arrays
(suffixes: B batch, T tokens) plus the raw texts and the records' dataset indices.

Padding:
  PromptBatch      LEFT-padded, so every prompt ends at the last column and generation appends after it.
  PreferenceBatch  RIGHT-padded prompt+response, chosen and rejected padded to one T (concatenate to [2B, T]).
  SFTBatch         RIGHT-padded prompt+completion.
`mask_BT` is True on real tokens (model positions = cumsum(mask) - 1, the model's default). `loss_mask_BT` is True
on response / completion tokens (their eos included), indexed by token position. With per-token log-probs
aligned as `logprob_BT1[:, t] = log p(tokens[:, t+1] | tokens[:, :t+1])`, weight them by `loss_mask_BT[:, 1:]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from real_jax.data.datasets import PreferenceRecord, PromptRecord, SFTRecord

__all__ = ["BatchIterator", "PreferenceBatch", "PromptBatch", "SFTBatch", "bucket_length", "collate_preferences",
           "collate_prompts", "collate_sft", "pad_sequences", "preference_batches", "prompt_batches", "sft_batches"]

MIN_BUCKET = 16


def bucket_length(length: int, buckets: Sequence[int] | None = None) -> int:
  """Smallest bucket >= `length`; default buckets are the powers of two >= 16."""
  if buckets is None:
    return max(MIN_BUCKET, 1 << max(int(length) - 1, 0).bit_length())
  fits = [b for b in buckets if b >= length]
  if not fits:
    raise ValueError(f"a sequence of {length} tokens is longer than the largest bucket {max(buckets)} "
                     f"(buckets {sorted(buckets)}); raise the buckets or lower max_prompt_len / max_response_len")
  return min(fits)


def pad_sequences(seqs: Sequence[Sequence[int]], length: int, pad_id: int, side: str) -> tuple[np.ndarray, np.ndarray]:
  """(tokens_BT int32, mask_BT bool) with each sequence padded to `length` on `side` ("left" or "right")."""
  if side not in ("left", "right"):
    raise ValueError(f"pad_sequences: side must be 'left' or 'right', got {side!r}")
  tokens_BT = np.full((len(seqs), length), pad_id, np.int32)
  mask_BT = np.zeros((len(seqs), length), bool)
  for b, s in enumerate(seqs):
    if len(s) > length:
      raise ValueError(f"pad_sequences: sequence {b} has {len(s)} tokens > length {length}")
    sl = slice(length - len(s), length) if side == "left" else slice(0, len(s))
    tokens_BT[b, sl] = s
    mask_BT[b, sl] = True
  return tokens_BT, mask_BT


@dataclasses.dataclass(frozen=True)
class PromptBatch:
  tokens_BT: np.ndarray  # int32, left-padded
  mask_BT: np.ndarray  # bool, True on prompt tokens
  prompts: list[str]
  answers: list[str | None]
  indices: np.ndarray  # int64 [B], dataset index of each row


@dataclasses.dataclass(frozen=True)
class PreferenceBatch:
  chosen_tokens_BT: np.ndarray  # int32, right-padded prompt + chosen
  chosen_mask_BT: np.ndarray
  chosen_loss_mask_BT: np.ndarray  # True on chosen-response tokens
  rejected_tokens_BT: np.ndarray
  rejected_mask_BT: np.ndarray
  rejected_loss_mask_BT: np.ndarray
  prompts: list[str]
  indices: np.ndarray


@dataclasses.dataclass(frozen=True)
class SFTBatch:
  tokens_BT: np.ndarray  # int32, right-padded prompt + completion
  mask_BT: np.ndarray
  loss_mask_BT: np.ndarray  # True on completion tokens
  prompts: list[str]
  completions: list[str]
  indices: np.ndarray


def collate_prompts(records: Sequence[PromptRecord], indices, *, pad_id: int,
                    buckets: Sequence[int] | None = None) -> PromptBatch:
  seqs = [r.prompt_ids for r in records]
  tokens_BT, mask_BT = pad_sequences(seqs, bucket_length(max(map(len, seqs)), buckets), pad_id, "left")
  return PromptBatch(tokens_BT, mask_BT, [r.prompt for r in records], [r.answer for r in records],
                     np.asarray(indices, np.int64))


def _with_loss_mask(prompts, responses, length, pad_id):
  tokens_BT, mask_BT = pad_sequences([p + r for p, r in zip(prompts, responses)], length, pad_id, "right")
  loss_BT = np.zeros_like(mask_BT)
  for b, (p, r) in enumerate(zip(prompts, responses)):
    loss_BT[b, len(p):len(p) + len(r)] = True
  return tokens_BT, mask_BT, loss_BT


def collate_preferences(records: Sequence[PreferenceRecord], indices, *, pad_id: int,
                        buckets: Sequence[int] | None = None) -> PreferenceBatch:
  prompts = [r.prompt_ids for r in records]
  longest = max(len(r.prompt_ids) + max(len(r.chosen_ids), len(r.rejected_ids)) for r in records)
  length = bucket_length(longest, buckets)
  chosen = _with_loss_mask(prompts, [r.chosen_ids for r in records], length, pad_id)
  rejected = _with_loss_mask(prompts, [r.rejected_ids for r in records], length, pad_id)
  return PreferenceBatch(*chosen, *rejected, [r.prompt for r in records], np.asarray(indices, np.int64))


def collate_sft(records: Sequence[SFTRecord], indices, *, pad_id: int,
                buckets: Sequence[int] | None = None) -> SFTBatch:
  length = bucket_length(max(len(r.prompt_ids) + len(r.completion_ids) for r in records), buckets)
  tokens_BT, mask_BT, loss_BT = _with_loss_mask([r.prompt_ids for r in records],
                                                [r.completion_ids for r in records], length, pad_id)
  return SFTBatch(tokens_BT, mask_BT, loss_BT, [r.prompt for r in records], [r.completion for r in records],
                  np.asarray(indices, np.int64))


class BatchIterator:
  """Infinite iterator of `collate(records, indices)` over `dataset`; see the module docstring.

  State: {"seed", "epoch", "position", "size"}; `position` counts records already served in the current epoch
  (for an infinite dataset: in total, with epoch 0).
  """

  def __init__(self, dataset, batch_size: int, collate: Callable[[list, np.ndarray], Any], *, seed: int = 0,
               shuffle: bool = True):
    self.dataset, self.collate, self.seed, self.shuffle = dataset, collate, int(seed), bool(shuffle)
    self.batch_size = int(batch_size)
    self.size = dataset.size if hasattr(dataset, "size") else len(dataset)
    if self.batch_size < 1:
      raise ValueError(f"BatchIterator: batch_size must be >= 1, got {batch_size}")
    if self.size is not None and self.size < self.batch_size:
      raise ValueError(f"BatchIterator: dataset {dataset!r} has {self.size} records < batch_size={self.batch_size}")
    self.epoch, self.position = 0, 0
    self._order_epoch, self._order = None, None

  def _epoch_order(self) -> np.ndarray:
    if self._order_epoch != self.epoch:
      rng = np.random.default_rng([self.seed, self.epoch])
      self._order = rng.permutation(self.size) if self.shuffle else np.arange(self.size)
      self._order_epoch = self.epoch
    return self._order

  def next_indices(self) -> np.ndarray:
    """Dataset indices of the next batch (advances the state)."""
    if self.size is None:
      idx = np.arange(self.position, self.position + self.batch_size)
    else:
      if self.position + self.batch_size > self.size:
        self.epoch, self.position = self.epoch + 1, 0
      idx = self._epoch_order()[self.position:self.position + self.batch_size]
    self.position += self.batch_size
    return idx

  def __iter__(self):
    return self

  def __next__(self):
    idx = self.next_indices()
    return self.collate([self.dataset[int(i)] for i in idx], idx)

  def state(self) -> dict[str, int | None]:
    return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "size": self.size}

  def restore(self, state: dict[str, Any]) -> None:
    """Continues from `state`; raises if it came from another seed or dataset size (no exact continuation)."""
    for key in ("seed", "size"):
      if state.get(key) != getattr(self, key):
        raise ValueError(f"BatchIterator.restore: state {key}={state.get(key)!r} but this iterator has "
                         f"{key}={getattr(self, key)!r}; the data order would differ")
    epoch, position = int(state["epoch"]), int(state["position"])
    if epoch < 0 or position < 0 or (self.size is not None and position > self.size):
      raise ValueError(f"BatchIterator.restore: invalid epoch={epoch} position={position} for size {self.size}")
    self.epoch, self.position = epoch, position


def _pad_id(dataset, pad_id):
  return dataset.tokenizer.pad_id if pad_id is None else pad_id


def prompt_batches(dataset, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                   buckets: Sequence[int] | None = None, pad_id: int | None = None) -> BatchIterator:
  """`PromptBatch`es (left-padded) over a `PromptDataset` or `TaskDataset`; pad_id defaults to the tokenizer's."""
  _check_buckets(dataset, buckets)
  pid = _pad_id(dataset, pad_id)
  return BatchIterator(dataset, batch_size, lambda r, i: collate_prompts(r, i, pad_id=pid, buckets=buckets),
                       seed=seed, shuffle=shuffle)


def preference_batches(dataset, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                       buckets: Sequence[int] | None = None, pad_id: int | None = None) -> BatchIterator:
  """`PreferenceBatch`es (right-padded) over a `PreferenceDataset`."""
  _check_buckets(dataset, buckets)
  pid = _pad_id(dataset, pad_id)
  return BatchIterator(dataset, batch_size, lambda r, i: collate_preferences(r, i, pad_id=pid, buckets=buckets),
                       seed=seed, shuffle=shuffle)


def sft_batches(dataset, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                buckets: Sequence[int] | None = None, pad_id: int | None = None) -> BatchIterator:
  """`SFTBatch`es (right-padded) over an `SFTDataset` or `TaskSFTDataset`."""
  _check_buckets(dataset, buckets)
  pid = _pad_id(dataset, pad_id)
  return BatchIterator(dataset, batch_size, lambda r, i: collate_sft(r, i, pad_id=pid, buckets=buckets),
                       seed=seed, shuffle=shuffle)


def _check_buckets(dataset, buckets):
  """Fails at construction when the dataset's longest sequence (if known) fits no bucket."""
  if buckets is not None:
    if not buckets or any(int(b) < 1 for b in buckets):
      raise ValueError(f"buckets must be a non-empty list of positive lengths, got {buckets!r}")
    longest = getattr(dataset, "max_length", None)
    if longest is not None:
      bucket_length(longest, buckets)

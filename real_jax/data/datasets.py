"""Datasets read from JSON lines: prompts (RL), preference pairs (DPO, reward models), SFT demonstrations.

Every dataset tokenizes and validates all of its lines at construction, so bad data fails before training starts,
and afterwards is a random-access sequence of frozen records (`PromptRecord`, `PreferenceRecord`, `SFTRecord`).
Only JSON is parsed; nothing is ever unpickled.

Token rules (the same for every tokenizer):
  prompt     [bos] + encode(prompt)       bos only when the tokenizer has one and `add_bos=True`
  response   encode(response) + [eos]     chosen / rejected / completion; eos teaches the model to stop

Bad lines (`on_error`). A line that is not valid UTF-8 or JSON, is not a JSON object, lacks a field, has a
non-string field, has an empty prompt, or holds text the tokenizer rejects, raises `DataError("<file>:<line>: ...")`
(`on_error="raise"`, the default), or is skipped and counted (`on_error="skip"`). Blank lines are ignored.

Long sequences (`on_long`, with `max_prompt_len` / `max_response_len` in tokens, None = unlimited):
  "truncate"  prompts keep their LAST tokens (left truncation: the end of a prompt, next to the response,
              matters most), after the bos which is always kept; responses keep their FIRST tokens and so lose
              their eos (a cut response did not end). Counted in `stats["truncated"]`.
  "reject"    raise `DataError` naming file, line and length.
  "skip"      drop the record, counted in `stats["skipped_long"]`.

`stats` holds lines, records, skipped_malformed, skipped_long and truncated; `skipped_errors` the first 20
messages of skipped lines; `num_skipped` their total. A dataset with no record left raises `DataError` naming the
file. `from_rows` builds the same datasets from in-memory dicts (source name "<rows>", 1-based row numbers).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from real_jax.data.tokenizers import Tokenizer

__all__ = ["DataError", "PreferenceDataset", "PreferenceRecord", "PromptDataset", "PromptRecord", "SFTDataset",
           "SFTRecord", "encode_prompt", "encode_response"]

ON_ERROR = ("raise", "skip")
ON_LONG = ("truncate", "reject", "skip")
_MAX_KEPT_ERRORS = 20


class DataError(ValueError):
  """Bad input data; the message starts with `<file>:<1-based line>:` when one line is at fault."""


@dataclasses.dataclass(frozen=True)
class PromptRecord:
  prompt: str
  prompt_ids: tuple[int, ...]
  answer: str | None = None


@dataclasses.dataclass(frozen=True)
class PreferenceRecord:
  prompt: str
  chosen: str
  rejected: str
  prompt_ids: tuple[int, ...]
  chosen_ids: tuple[int, ...]
  rejected_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class SFTRecord:
  prompt: str
  completion: str
  prompt_ids: tuple[int, ...]
  completion_ids: tuple[int, ...]


class _BadLine(Exception):
  """A malformed line (subject to on_error)."""


class _TooLong(DataError):
  """A sequence over its limit under on_long="reject" or "skip"."""


def encode_prompt(tokenizer: Tokenizer, text: str, max_len: int | None = None, on_long: str = "truncate",
                  add_bos: bool = True) -> tuple[tuple[int, ...], bool]:
  """(ids, truncated) of a prompt under the module's rules; over `max_len` with on_long="reject" or "skip" it
  raises `DataError` (a subclass: the datasets catch it to reject or skip with file:line)."""
  ids = tokenizer.encode(text)
  bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
  total = len(bos) + len(ids)
  if max_len is None or total <= max_len:
    return tuple(bos + ids), False
  if on_long != "truncate":
    raise _TooLong(f"prompt has {total} tokens > max_prompt_len={max_len}")
  keep = max_len - len(bos)
  return tuple(bos + ids[len(ids) - keep:]), True


def encode_response(tokenizer: Tokenizer, text: str, max_len: int | None = None,
                    on_long: str = "truncate") -> tuple[tuple[int, ...], bool]:
  """(ids + [eos], truncated) of a response; truncation keeps the first `max_len` tokens, else as `encode_prompt`."""
  ids = tokenizer.encode(text) + [tokenizer.eos_id]
  if max_len is None or len(ids) <= max_len:
    return tuple(ids), False
  if on_long != "truncate":
    raise _TooLong(f"response has {len(ids)} tokens (with eos) > max_response_len={max_len}")
  return tuple(ids[:max_len]), True


def _check_choice(owner: str, name: str, value: Any, allowed: Sequence[Any]) -> None:
  if value not in allowed:
    raise ValueError(f"{owner}: {name} must be one of {list(allowed)}, got {value!r}")


def _iter_jsonl(path: str) -> Iterator[tuple[int, Any]]:
  """(1-based line, parsed object or _BadLine) for every non-blank line."""
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield lineno, _BadLine(f"not valid UTF-8 ({e.reason} at byte {e.start})")
        continue
      if not line.strip():
        continue
      try:
        yield lineno, json.loads(line)
      except json.JSONDecodeError as e:
        yield lineno, _BadLine(f"invalid JSON ({e.msg} at column {e.colno})")


class _JsonlDataset(Sequence):
  """Shared reading, validation and bookkeeping; subclasses define `_fields` and `_make`."""

  def __init__(self, path: str | os.PathLike | None, tokenizer: Tokenizer, *, max_prompt_len: int | None = None,
               on_long: str = "truncate", on_error: str = "raise", add_bos: bool = True,
               _rows: Iterable[tuple[int, Any]] | None = None, _source: str | None = None):
    owner = type(self).__name__
    _check_choice(owner, "on_error", on_error, ON_ERROR)
    _check_choice(owner, "on_long", on_long, ON_LONG)
    min_prompt = 2 if add_bos and tokenizer.bos_id is not None else 1
    if max_prompt_len is not None and max_prompt_len < min_prompt:
      raise ValueError(f"{owner}: max_prompt_len must be >= {min_prompt}, got {max_prompt_len}")
    self.tokenizer = tokenizer
    self.max_prompt_len, self.on_long, self.on_error, self.add_bos = max_prompt_len, on_long, on_error, add_bos
    self.source = _source if _source is not None else os.fspath(path)
    self.stats = {"lines": 0, "records": 0, "skipped_malformed": 0, "skipped_long": 0, "truncated": 0}
    self.skipped_errors: list[str] = []
    self._records: list = []
    rows = _rows if _rows is not None else _iter_jsonl(self.source)
    for lineno, obj in rows:
      self.stats["lines"] += 1
      where = f"{self.source}:{lineno}"
      try:
        if isinstance(obj, _BadLine):
          raise obj
        if not isinstance(obj, dict):
          raise _BadLine(f"expected a JSON object, got {type(obj).__name__}")
        record, truncated = self._make(obj)
      except _BadLine as e:
        self._skip_or_raise(where, str(e), "skipped_malformed", on_error == "skip")
        continue
      except _TooLong as e:
        self._skip_or_raise(where, str(e), "skipped_long", on_long == "skip")
        continue
      self.stats["truncated"] += int(truncated)
      self._records.append(record)
    self.stats["records"] = len(self._records)
    if not self._records:
      raise DataError(f"{self.source}: no records ({self.stats['lines']} non-blank lines, "
                      f"{self.stats['skipped_malformed']} malformed and {self.stats['skipped_long']} too long skipped)"
                      + (f"; first problem: {self.skipped_errors[0]}" if self.skipped_errors else ""))
    self.size = len(self._records)
    self.max_length = max(self._length(r) for r in self._records)

  @classmethod
  def from_rows(cls, rows: Iterable[Any], tokenizer: Tokenizer, *, source: str = "<rows>", **kwargs):
    """The same dataset from in-memory rows (dicts); errors name `source` and the 1-based row number."""
    return cls(None, tokenizer, _rows=enumerate(rows, start=1), _source=source, **kwargs)

  def _skip_or_raise(self, where: str, msg: str, counter: str, skip: bool) -> None:
    if not skip:
      raise DataError(f"{where}: {msg}")
    self.stats[counter] += 1
    if len(self.skipped_errors) < _MAX_KEPT_ERRORS:
      self.skipped_errors.append(f"{where}: {msg}")

  @property
  def num_skipped(self) -> int:
    return self.stats["skipped_malformed"] + self.stats["skipped_long"]

  def _field(self, obj: dict, key: str, *, nonempty: bool = False) -> str:
    if key not in obj:
      raise _BadLine(f"missing field {key!r} (fields present: {sorted(obj)[:10]})")
    value = obj[key]
    if not isinstance(value, str):
      raise _BadLine(f"field {key!r} must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
      raise _BadLine(f"field {key!r} is empty")
    return value

  def _encode(self, fn, *args, **kwargs):
    try:
      return fn(self.tokenizer, *args, **kwargs)
    except _TooLong:
      raise
    except ValueError as e:  # the tokenizer rejected the text, e.g. a character outside CharTokenizer's alphabet
      raise _BadLine(str(e)) from None

  def _make(self, obj: dict):
    raise NotImplementedError

  def _length(self, record) -> int:
    raise NotImplementedError

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index):
    return self._records[index]

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.source!r}, records={len(self)}, skipped={self.num_skipped})"


class PromptDataset(_JsonlDataset):
  """Prompts for RL, each with an optional ground-truth answer: `{"prompt": ..., "answer": ...}`.

  Field names are `prompt_key` and `answer_key` (None: no answer; then every record's answer is None).
  """

  def __init__(self, path, tokenizer: Tokenizer, *, prompt_key: str = "prompt", answer_key: str | None = None,
               **kwargs):
    self.prompt_key, self.answer_key = prompt_key, answer_key
    super().__init__(path, tokenizer, **kwargs)

  def _make(self, obj):
    prompt = self._field(obj, self.prompt_key, nonempty=True)
    answer = self._field(obj, self.answer_key) if self.answer_key is not None else None
    ids, truncated = self._encode(encode_prompt, prompt, self.max_prompt_len, self.on_long, self.add_bos)
    return PromptRecord(prompt, ids, answer), truncated

  def _length(self, record):
    return len(record.prompt_ids)


class PreferenceDataset(_JsonlDataset):
  """Preference pairs for DPO and reward models: `{"prompt": ..., "chosen": ..., "rejected": ...}`.

  `chosen` and `rejected` are responses to the prompt (not prompt + response). Limits: `max_prompt_len`,
  `max_response_len` per response.
  """

  def __init__(self, path, tokenizer: Tokenizer, *, prompt_key: str = "prompt", chosen_key: str = "chosen",
               rejected_key: str = "rejected", max_response_len: int | None = None, **kwargs):
    self.keys = (prompt_key, chosen_key, rejected_key)
    self.max_response_len = max_response_len
    super().__init__(path, tokenizer, **kwargs)

  def _make(self, obj):
    pk, ck, rk = self.keys
    prompt = self._field(obj, pk, nonempty=True)
    chosen, rejected = self._field(obj, ck), self._field(obj, rk)
    p_ids, t0 = self._encode(encode_prompt, prompt, self.max_prompt_len, self.on_long, self.add_bos)
    c_ids, t1 = self._encode(encode_response, chosen, self.max_response_len, self.on_long)
    r_ids, t2 = self._encode(encode_response, rejected, self.max_response_len, self.on_long)
    return PreferenceRecord(prompt, chosen, rejected, p_ids, c_ids, r_ids), t0 or t1 or t2

  def _length(self, record):
    return len(record.prompt_ids) + max(len(record.chosen_ids), len(record.rejected_ids))


class SFTDataset(_JsonlDataset):
  """Demonstrations for supervised fine-tuning: `{"prompt": ..., "completion": ...}`; loss on the completion."""

  def __init__(self, path, tokenizer: Tokenizer, *, prompt_key: str = "prompt", completion_key: str = "completion",
               max_response_len: int | None = None, **kwargs):
    self.prompt_key, self.completion_key = prompt_key, completion_key
    self.max_response_len = max_response_len
    super().__init__(path, tokenizer, **kwargs)

  def _make(self, obj):
    prompt = self._field(obj, self.prompt_key, nonempty=True)
    completion = self._field(obj, self.completion_key)
    p_ids, t0 = self._encode(encode_prompt, prompt, self.max_prompt_len, self.on_long, self.add_bos)
    c_ids, t1 = self._encode(encode_response, completion, self.max_response_len, self.on_long)
    return SFTRecord(prompt, completion, p_ids, c_ids), t0 or t1

  def _length(self, record):
    return len(record.prompt_ids) + len(record.completion_ids)

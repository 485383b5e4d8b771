"""Rule-based rewards: pure functions of text, registered by name, plus a helper that scores token arrays.

A reward function is `fn(prompt: str, response: str, answer: str | None, **params) -> float`, where `response`
is the decoded generation cut at its first EOS (see `decode_responses`) and `answer` the ground truth, when the
data has one. Configs pick a reward by name: `get_reward("char_overlap", align="right")` binds the keyword
parameters and checks their names at once.

Registered here:
  exact_match     1.0 iff `response.strip() == answer.strip()`, else 0.0.
  char_overlap    dense partial credit: matching characters / max(len(response), len(answer)) after stripping;
                  1.0 iff equal, so every wrong answer scores < 1.0 and extra characters cost.
  length_penalty  -scale * max(0, len(response) - target_len) / target_len in characters after stripping (0 when
                  short enough); target_len defaults to len(answer). Meant to be combined with a correctness
                  reward: `combine_rewards({"exact_match": 1.0, "length_penalty": 0.1})`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from real_jax.data.tokenizers import Tokenizer

__all__ = ["RewardFn", "combine_rewards", "decode_responses", "get_reward", "list_rewards", "register_reward",
           "score_responses"]

RewardFn = Callable[[str, str, "str | None"], float]

_REWARDS: dict[str, Callable[..., float]] = {}


def register_reward(name: str) -> Callable[[Callable[..., float]], Callable[..., float]]:
  """Decorator: registers `fn(prompt, response, answer, **params) -> float` under `name`."""

  def deco(fn):
    if name in _REWARDS and _REWARDS[name] is not fn:
      raise ValueError(f"reward {name!r} is already registered (by {_REWARDS[name].__qualname__})")
    _REWARDS[name] = fn
    return fn

  return deco


def list_rewards() -> list[str]:
  return sorted(_REWARDS)


def get_reward(name: str, **params) -> RewardFn:
  """The registered reward `name` with keyword `params` bound; unknown names or parameters raise, listing options."""
  if name not in _REWARDS:
    raise KeyError(f"unknown reward {name!r}; known rewards: {', '.join(list_rewards())}")
  fn = _REWARDS[name]
  allowed = [p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY]
  unknown = sorted(set(params) - set(allowed))
  if unknown:
    raise TypeError(f"reward {name!r} has no parameter(s) {unknown}; its parameters: {allowed}")
  return functools.partial(fn, **params) if params else fn


def _need_answer(name: str, answer: str | None) -> str:
  if answer is None:
    raise ValueError(f"reward {name!r} needs a ground-truth answer, got None (does the dataset set answer_key?)")
  return answer


@register_reward("exact_match")
def exact_match(prompt: str, response: str, answer: str | None) -> float:
  """1.0 iff the stripped response equals the stripped answer."""
  del prompt
  return float(response.strip() == _need_answer("exact_match", answer).strip())


@register_reward("char_overlap")
def char_overlap(prompt: str, response: str, answer: str | None, *, align: str = "left") -> float:
  """Matching characters / max(len) after stripping; `align="right"` compares from the end (numbers: ones digit).

  1.0 iff response == answer (both stripped); 1.0 for two empty strings.
  """
  del prompt
  a, r = _need_answer("char_overlap", answer).strip(), response.strip()
  if align not in ("left", "right"):
    raise ValueError(f"char_overlap: align must be 'left' or 'right', got {align!r}")
  if align == "right":
    a, r = a[::-1], r[::-1]
  n = max(len(a), len(r))
  if n == 0:
    return 1.0
  return sum(x == y for x, y in zip(a, r)) / n


@register_reward("length_penalty")
def length_penalty(prompt: str, response: str, answer: str | None, *, target_len: int | None = None,
                   scale: float = 1.0) -> float:
  """-scale * max(0, len(response) - target) / target, target = `target_len` or len(answer)."""
  del prompt
  target = target_len if target_len is not None else len(_need_answer("length_penalty", answer).strip())
  target = max(int(target), 1)
  return -scale * max(0, len(response.strip()) - target) / target


def combine_rewards(weights: Mapping[str, float], params: Mapping[str, Mapping] | None = None) -> RewardFn:
  """Weighted sum of registered rewards, e.g. `combine_rewards({"exact_match": 1.0, "length_penalty": 0.1})`."""
  params = params or {}
  parts = [(w, get_reward(n, **params.get(n, {}))) for n, w in weights.items()]

  def combined(prompt: str, response: str, answer: str | None) -> float:
    return float(sum(w * fn(prompt, response, answer) for w, fn in parts))

  return combined


def decode_responses(tokenizer: Tokenizer, response_BT, mask_BT=None) -> list[str]:
  """Decodes each row of generated ids: keeps positions where `mask_BT` is True (all when None), cuts at the first
  EOS (exclusive), drops pad ids, then decodes. Rows are responses only (no prompt tokens)."""
  ids_BT = np.asarray(response_BT)
  if ids_BT.ndim != 2:
    raise ValueError(f"decode_responses: expected [B, T] ids, got shape {ids_BT.shape}")
  keep_BT = np.ones(ids_BT.shape, bool) if mask_BT is None else np.asarray(mask_BT, bool)
  if keep_BT.shape != ids_BT.shape:
    raise ValueError(f"decode_responses: mask shape {keep_BT.shape} != ids shape {ids_BT.shape}")
  out = []
  for row, keep in zip(ids_BT, keep_BT):
    row = row[keep]
    eos = np.flatnonzero(row == tokenizer.eos_id)
    if eos.size:
      row = row[:eos[0]]
    out.append(tokenizer.decode(row[row != tokenizer.pad_id].tolist()))
  return out


def score_responses(reward_fn: RewardFn | str, tokenizer: Tokenizer, prompts: Sequence[str], response_BT,
                    answers: Sequence[str | None] | None = None, mask_BT=None) -> np.ndarray:
  """Decodes `response_BT` with `decode_responses` and scores row b with `reward_fn(prompts[b], text_b, answers[b])`.

  Returns float32 [B]. `reward_fn` may be a registered name.
  """
  fn = get_reward(reward_fn) if isinstance(reward_fn, str) else reward_fn
  texts = decode_responses(tokenizer, response_BT, mask_BT)
  answers = [None] * len(texts) if answers is None else list(answers)
  if not len(prompts) == len(answers) == len(texts):
    raise ValueError(f"score_responses: {len(prompts)} prompts, {len(answers)} answers, {len(texts)} responses")
  return np.asarray([fn(p, t, a) for p, t, a in zip(prompts, texts, answers)], np.float32)

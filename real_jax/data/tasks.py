"""Synthetic verifiable tasks: prompts with known answers and rule-based rewards, for tiny-model RLHF tests.

A task is registered by name and makes example `index` of seed `seed` from `np.random.default_rng([seed, index])`,
so examples are deterministic and random-access (an iterator can resume anywhere). Every prompt ends with `=`
and fits `CharTokenizer`'s alphabet.

  name        prompt           answer   difficulty d
  arithmetic  "37+5="          "42"     operands in [0, 10**d); `ops` picks from "+-*"
  sorting     "sort:3142="     "1234"   2 .. 2+2d digits
  reversal    "reverse:abc="   "cba"    2 .. 2+2d lowercase letters
  copy        "copy:abc="      "abc"    2 .. 2+2d lowercase letters

`task.reward(prompt, response, answer)` is 1.0 iff the stripped response equals the answer. With
`partial_credit=True` (the default) a wrong response still earns `char_overlap` (matching characters / max length,
right-aligned for arithmetic so the ones digit counts first), always < 1.0: a dense signal for a tiny model.
With `partial_credit=False` it is `exact_match` (0 or 1).

`TaskDataset` serves `PromptRecord`s for RL, `TaskSFTDataset` `SFTRecord`s (prompt, answer) for warm-starting;
both are finite (`size=n`) or infinite (`size=None`).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import ClassVar

import numpy as np

from real_jax.data.datasets import PromptRecord, SFTRecord, encode_prompt, encode_response
from real_jax.data.rewards import char_overlap, exact_match
from real_jax.data.tokenizers import Tokenizer

__all__ = ["Example", "Task", "TaskDataset", "TaskSFTDataset", "get_task", "list_tasks", "register_task"]

_TASKS: dict[str, type[Task]] = {}
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclasses.dataclass(frozen=True)
class Example:
  prompt: str
  answer: str


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
  """Class decorator: registers a `Task` subclass under `name`."""

  def deco(cls):
    if name in _TASKS and _TASKS[name] is not cls:
      raise ValueError(f"task {name!r} is already registered (by {_TASKS[name].__qualname__})")
    cls.name = name
    _TASKS[name] = cls
    return cls

  return deco


def list_tasks() -> list[str]:
  return sorted(_TASKS)


def get_task(name: str, **kwargs) -> Task:
  """A new instance of the registered task `name` (kwargs go to its constructor)."""
  if name not in _TASKS:
    raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}")
  return _TASKS[name](**kwargs)


class Task(abc.ABC):
  """A verifiable task. Subclasses implement `make(rng) -> (prompt, answer)`."""

  name: ClassVar[str] = "task"
  align: ClassVar[str] = "left"  # char_overlap alignment for partial credit

  def __init__(self, difficulty: int = 1, partial_credit: bool = True):
    if int(difficulty) < 1:
      raise ValueError(f"{self.name}: difficulty must be >= 1, got {difficulty}")
    self.difficulty, self.partial_credit = int(difficulty), bool(partial_credit)

  @abc.abstractmethod
  def make(self, rng: np.random.Generator) -> tuple[str, str]:
    ...

  def example(self, seed: int, index: int) -> Example:
    """Example `index` of stream `seed`; the same pair on every call and machine."""
    return Example(*self.make(np.random.default_rng([int(seed), int(index)])))

  def reward(self, prompt: str, response: str, answer: str | None) -> float:
    if self.partial_credit:
      return char_overlap(prompt, response, answer, align=self.align)
    return exact_match(prompt, response, answer)

  def _length(self, rng: np.random.Generator) -> int:
    return int(rng.integers(2, 3 + 2 * self.difficulty))

  def __repr__(self) -> str:
    return f"{type(self).__name__}(difficulty={self.difficulty}, partial_credit={self.partial_credit})"


@register_task("arithmetic")
class Arithmetic(Task):
  align = "right"

  def __init__(self, difficulty: int = 1, partial_credit: bool = True, ops: str = "+"):
    super().__init__(difficulty, partial_credit)
    if not ops or set(ops) - set("+-*"):
      raise ValueError(f"arithmetic: ops must be a non-empty subset of '+-*', got {ops!r}")
    self.ops = ops

  def make(self, rng):
    hi = 10 ** self.difficulty
    a, b = (int(x) for x in rng.integers(0, hi, size=2))
    op = self.ops[int(rng.integers(len(self.ops)))]
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"{a}{op}{b}=", str(value)


@register_task("sorting")
class Sorting(Task):

  def make(self, rng):
    digits = "".join(str(int(d)) for d in rng.integers(0, 10, size=self._length(rng)))
    return f"sort:{digits}=", "".join(sorted(digits))


@register_task("reversal")
class Reversal(Task):

  def make(self, rng):
    s = "".join(_LETTERS[int(i)] for i in rng.integers(0, 26, size=self._length(rng)))
    return f"reverse:{s}=", s[::-1]


@register_task("copy")
class Copy(Task):

  def make(self, rng):
    s = "".join(_LETTERS[int(i)] for i in rng.integers(0, 26, size=self._length(rng)))
    return f"copy:{s}=", s


class _TaskSource:

  def __init__(self, task: Task | str, tokenizer: Tokenizer, *, seed: int = 0, size: int | None = None,
               add_bos: bool = True):
    self.task = get_task(task) if isinstance(task, str) else task
    if size is not None and int(size) < 1:
      raise ValueError(f"{type(self).__name__}: size must be >= 1 or None (infinite), got {size}")
    self.tokenizer, self.seed, self.add_bos = tokenizer, int(seed), add_bos
    self.size = None if size is None else int(size)
    self.max_length = None  # unknown without generating every example

  def _example(self, index: int) -> Example:
    index = int(index)
    if index < 0 or (self.size is not None and index >= self.size):
      raise IndexError(f"{type(self).__name__}: index {index} out of range (size {self.size})")
    return self.task.example(self.seed, index)

  def __len__(self) -> int:
    if self.size is None:
      raise TypeError(f"{type(self).__name__} of task {self.task.name!r} is infinite (size=None)")
    return self.size

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.task!r}, seed={self.seed}, size={self.size})"


class TaskDataset(_TaskSource):
  """`PromptRecord(prompt, [bos] + ids, answer)` for example i of `task` under `seed`; infinite when size is None."""

  def __getitem__(self, index: int) -> PromptRecord:
    ex = self._example(index)
    ids, _ = encode_prompt(self.tokenizer, ex.prompt, add_bos=self.add_bos)
    return PromptRecord(ex.prompt, ids, ex.answer)


class TaskSFTDataset(_TaskSource):
  """`SFTRecord(prompt, answer, [bos] + ids, answer ids + [eos])`: demonstrations for warm-starting with SFT."""

  def __getitem__(self, index: int) -> SFTRecord:
    ex = self._example(index)
    p_ids, _ = encode_prompt(self.tokenizer, ex.prompt, add_bos=self.add_bos)
    c_ids, _ = encode_response(self.tokenizer, ex.answer)
    return SFTRecord(ex.prompt, ex.answer, p_ids, c_ids)

"""The dataflow graph of one RLHF iteration: calls, their data edges and parameter-version edges.

A `Call` (ReaL's "model function call") is one of GENERATE / INFERENCE / TRAIN_STEP on one model.
It names the batch keys it reads (`inputs`) and writes (`outputs`). Data edges go from the call that
produces a key to every call that reads it; keys produced by no call must be *external* (e.g. the
prompts that the data loader supplies). Across iterations, a model's calls in iteration i+1 wait for
its last TRAIN_STEP in iteration i (the parameter version); frozen models have no such edge.

PPO, for instance:

    actor_gen -> {reward_inf, ref_inf, critic_inf} -> {actor_train, critic_train}
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Sequence


class CallKind(enum.Enum):
  GENERATE = "generate"
  INFERENCE = "inference"
  TRAIN_STEP = "train_step"


@dataclasses.dataclass(frozen=True)
class Call:
  """One model function call.

  name: unique within the graph (e.g. "actor_gen").
  model: the role whose parameters it uses ("actor", "critic", "ref", "reward", ...).
  kind: GENERATE, INFERENCE or TRAIN_STEP.
  inputs / outputs: batch keys read and written.
  batch: number of sequences the call processes per iteration (prompts x samples).
  """

  name: str
  model: str
  kind: CallKind
  inputs: tuple[str, ...] = ()
  outputs: tuple[str, ...] = ()
  batch: int = 1

  def __post_init__(self):
    if not self.name or not self.model:
      raise ValueError(f"Call needs a name and a model, got name={self.name!r} model={self.model!r}")
    if not isinstance(self.kind, CallKind):
      raise ValueError(f"call {self.name!r}: kind must be a CallKind, got {self.kind!r}")
    object.__setattr__(self, "inputs", tuple(self.inputs))
    object.__setattr__(self, "outputs", tuple(self.outputs))
    if self.batch < 1:
      raise ValueError(f"call {self.name!r}: batch must be >= 1, got {self.batch}")


@dataclasses.dataclass(frozen=True)
class Edge:
  src: str
  dst: str
  key: str


class GraphError(ValueError):
  """A graph that cannot run: the message names the call and the key at fault."""


class Graph:
  """A validated DAG of calls over a set of models."""

  def __init__(self, calls: Sequence[Call], models: Iterable[str], external: Iterable[str] = ("prompts",)):
    self.calls: tuple[Call, ...] = tuple(calls)
    self.models: tuple[str, ...] = tuple(models)
    self.external: frozenset[str] = frozenset(external)
    self._by_name = {}
    for c in self.calls:
      if c.name in self._by_name:
        raise GraphError(f"two calls are named {c.name!r}")
      if c.model not in self.models:
        raise GraphError(f"call {c.name!r} uses unknown model {c.model!r}; models are {list(self.models)}")
      self._by_name[c.name] = c
    producer: dict[str, str] = {}
    for c in self.calls:
      for key in c.outputs:
        if key in producer:
          raise GraphError(f"key {key!r} is produced by both {producer[key]!r} and {c.name!r}")
        if key in self.external:
          raise GraphError(f"call {c.name!r} produces {key!r}, which is an external input")
        producer[key] = c.name
    self.producer = producer
    edges = []
    for c in self.calls:
      for key in c.inputs:
        if key in self.external:
          continue
        if key not in producer:
          raise GraphError(f"call {c.name!r} reads {key!r}, which no call produces and is not external "
                           f"(external: {sorted(self.external)})")
        edges.append(Edge(producer[key], c.name, key))
    self.edges: tuple[Edge, ...] = tuple(edges)
    self.order: tuple[str, ...] = self._toposort()

  def __getitem__(self, name: str) -> Call:
    if name not in self._by_name:
      raise KeyError(f"no call named {name!r}; calls are {[c.name for c in self.calls]}")
    return self._by_name[name]

  def parents(self, name: str) -> list[str]:
    return sorted({e.src for e in self.edges if e.dst == name})

  def _toposort(self) -> tuple[str, ...]:
    indeg = {c.name: 0 for c in self.calls}
    for e in {(e.src, e.dst) for e in self.edges}:
      indeg[e[1]] += 1
    ready = [c.name for c in self.calls if indeg[c.name] == 0]  # Declaration order breaks ties.
    order = []
    pairs = {(e.src, e.dst) for e in self.edges}
    while ready:
      n = ready.pop(0)
      order.append(n)
      for c in self.calls:
        if (n, c.name) in pairs:
          indeg[c.name] -= 1
          if indeg[c.name] == 0:
            ready.append(c.name)
    if len(order) != len(self.calls):
      stuck = [c.name for c in self.calls if c.name not in order]
      keys = sorted({e.key for e in self.edges if e.dst in stuck and e.src in stuck})
      raise GraphError(f"the graph has a cycle through calls {stuck} (keys {keys})")
    return tuple(order)

  def trained_models(self) -> set[str]:
    return {c.model for c in self.calls if c.kind is CallKind.TRAIN_STEP}

  def last_train_call(self, model: str) -> str | None:
    trains = [n for n in self.order if self[n].model == model and self[n].kind is CallKind.TRAIN_STEP]
    return trains[-1] if trains else None

  def unroll(self, iterations: int) -> list[tuple[tuple[int, str], list[tuple[int, str]]]]:
    """Tasks (iteration, call) in a valid order, each with its dependencies.

    Dependencies: the data edges inside an iteration, and for iteration i > 0 a parameter-version
    edge from the model's last train call of iteration i-1 to each of its calls.
    """
    tasks = []
    for i in range(iterations):
      for name in self.order:
        deps = [(i, p) for p in self.parents(name)]
        last = self.last_train_call(self[name].model)
        if i > 0 and last is not None:
          deps.append((i - 1, last))
        tasks.append(((i, name), deps))
    return tasks

  def __repr__(self) -> str:
    lines = [f"Graph(models={list(self.models)})"]
    for n in self.order:
      c = self[n]
      lines.append(f"  {n}: {c.model} {c.kind.value} {list(c.inputs)} -> {list(c.outputs)} (batch {c.batch})")
    return "\n".join(lines)

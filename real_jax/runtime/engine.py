"""The engine: runs the calls of a dataflow graph under an ExecutionPlan.

* Every model rests in a *home* layout: its train layout (the plan's layout of its last TRAIN_STEP
  call) or, for frozen models, the layout of its first call.
* Before a call, the engine makes the model's parameters available in the call's layout with
  `sharding.reallocate`. A copy is kept per (parameter version, placement: `search.space.placement`) until
  the last call of the iteration that reads it has been dispatched, then dropped (JAX keeps its buffers
  until that call has run): consecutive calls under one layout move nothing, and no copy occupies
  memory during the calls after its last reader. Keeping copies longer had a 7B critic's replicated
  inference copy and the actor's generation copy resident through the critic's train step on 4x H200,
  which ran out of memory in a plan the simulator (which counts a copy only while it is read) fitted.
* Batch arrays produced by one call are moved to the next call's mesh the same way (batch axis over
  data x fsdp), never through the host. A move is ordered behind the work already queued on both its
  source and its target devices, so it is issued at the latest point that queues it behind nothing
  unrelated on the source: when its reader is dispatched, or earlier, just before another call is
  dispatched on the devices that hold the array. Moving only at the reader's dispatch made, e.g., the
  critic's train step in a disaggregated PPO plan (4x H200) wait for the actor's train step on another
  GPU, which had been queued first on the generation GPU holding the critic's tokens; moving right after
  the producer would instead make every call dispatched later on the reader's devices wait for the
  producer.
* Calls are dispatched asynchronously in topological order; JAX runs calls on disjoint meshes
  concurrently. A watcher thread waits for each call's outputs and records its end time, so the
  timeline shows real overlap without the main thread ever blocking on it. Only a call that needs
  host data (a rule-based reward decoding text) blocks, and only on its own inputs.
* Train calls are dispatched by their own host thread (`concurrent_train`, default on in
  single-process runs), and later calls on other devices that neither share the model nor read the
  train call's outputs go on at once. A train call's host stays blocked while its device works: on
  4x H200 each PPO train step's dispatch waited for the step before it (its donated state), 190-400 ms
  for a 1.3B actor on one GPU, and the advantages program waited 376 ms for inputs copied from other
  GPUs; so the critic's train step on another GPU was dispatched only when the actor's was nearly done
  (the host was inside the actor's train call for 72-87% of it). Multi-process runs keep one thread,
  so every process dispatches in the same order.
* A call that fails on the device (e.g. out of memory) is raised by the next dispatch or `wait`, as
  `CallFailed` naming the call. A failed program can leave calls queued behind it waiting forever in a
  collective whose peers never start (seen on 4x H200: an out-of-memory train step on GPUs 2-3, then
  the next program on GPUs 0-1 stuck in NCCL's rendezvous), with the main thread blocked inside JAX.
  So if the main thread has not raised the error within `abort_after_s`, the engine prints it and
  exits the process (status 70) instead of holding the devices forever; None turns this off.
* Frozen models whose name the plan lists in `offload` rest in host memory from the engine's start and
  between their calls.

The engine knows nothing of any algorithm: a *program* (e.g. `real_jax.runtime.ppo`) supplies one
function per call, `fn(engine, call, layout, inputs) -> outputs`.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx

from real_jax.dataflow import CallKind, Graph
from search.plan import ExecutionPlan
from search.space import placement
from sharding import Layout, activation_sharding, reallocate, shardings_for


class CallFailed(RuntimeError):
  """A dispatched call (or reallocation) failed while running on its devices."""


ABORT_EXIT_STATUS = 70


@dataclasses.dataclass
class ModelSlot:
  """One model's state: parameters at home, an optional train state, and cached copies.

  graphdef: the nnx GraphDef. params: the nnx.State of parameters in `home`.
  train_state: the optimizer state object of a trained model (owned by the program), or None.
  version: bumps whenever the program replaces `params` (after a train step).
  """

  name: str
  graphdef: Any
  params: Any
  home: Layout
  train_state: Any = None
  version: int = 0
  offloaded: bool = False
  _copies: dict = dataclasses.field(default_factory=dict)

  def set_params(self, params: Any) -> None:
    self.params = params
    self.offloaded = False  # Wherever the new arrays live; the engine rests it again (Engine.rest_offloaded).
    self.version += 1
    self._copies.clear()


@dataclasses.dataclass
class Record:
  """One timeline entry: a call or a reallocation, on a device range, with wall-clock times."""

  iteration: int
  name: str
  kind: str  # "call", "realloc", "data"
  devices: tuple[int, int]  # (start, size)
  start: float
  end: float | None = None
  bytes: int = 0

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


class Engine:
  """Executes iterations of `graph` under `plan` with one function per call."""

  def __init__(self, graph: Graph, plan: ExecutionPlan, slots: Mapping[str, ModelSlot],
               functions: Mapping[str, Callable], *, validate: bool = True, abort_after_s: float | None = 120.0,
               concurrent_train: bool | None = None):
    plan.check_covers([c.name for c in graph.calls])
    self.graph, self.plan = graph, plan
    self.slots = dict(slots)
    self.functions = dict(functions)
    missing = [c.name for c in graph.calls if c.name not in self.functions]
    if missing:
      raise ValueError(f"no function given for calls {missing}")
    self.timeline: list[Record] = []
    self._same_placement: dict[tuple, bool] = {}
    self._watchers: list[tuple[threading.Thread, int, int]] = []  # (watcher, its record's first device, last + 1)
    self._errors: list[tuple[str, BaseException]] = []
    self._error_lock = threading.Lock()
    self._abort_timer: threading.Timer | None = None
    self._disarmed = False  # After the main thread has raised a failure: no exit timer any more.
    self.abort_after_s = abort_after_s
    self.concurrent_train = jax.process_count() == 1 if concurrent_train is None else bool(concurrent_train)
    self._t0 = time.perf_counter()
    self.iteration = 0
    if validate:
      self.check_plan()
    check_offload(graph, plan)  # Even unvalidated: offloading a trained model would lose its updates.
    self.rest_offloaded()

  def rest_offloaded(self) -> None:
    """Moves every model the plan offloads to host memory: at the start (the planner counts them resting, not
    on the devices until their call) and after their parameters are set again (a resume)."""
    for model in sorted(set(self.plan.offload) & set(self.slots)):
      self.offload(model)

  # -- plan checks -----------------------------------------------------------------------------

  def check_plan(self) -> None:
    """Fails before anything compiles when a layout does not fit the devices, heads or batch."""
    check_plan(self.graph, self.plan, {m: s.params for m, s in self.slots.items()})

  # -- timing ----------------------------------------------------------------------------------

  def now(self) -> float:
    return time.perf_counter() - self._t0

  def _watch(self, record: Record, tree: Any) -> None:
    def wait():
      try:
        jax.block_until_ready(tree)
      except Exception as e:  # noqa: BLE001 (a device error of any type: re-raised by the main thread)
        self._failed(record.name, e)
      record.end = self.now()
    t = threading.Thread(target=wait, daemon=True)
    t.start()
    self._watchers.append((t, record.devices[0], record.devices[0] + record.devices[1]))

  def _wait_for_devices(self, devices: set[int]) -> None:
    """Blocks until the calls and moves dispatched so far on any of `devices` (positions) have finished."""
    for t, lo, hi in list(self._watchers):
      if any(lo <= d < hi for d in devices):
        self._join(t)

  def _failed(self, name: str, error: BaseException) -> None:
    with self._error_lock:
      self._errors.append((name, error))
      if self.abort_after_s is not None and self._abort_timer is None and not self._disarmed:
        self._abort_timer = threading.Timer(self.abort_after_s, self._abort)
        self._abort_timer.daemon = True
        self._abort_timer.start()

  def _disarm(self) -> None:
    """The main thread has the failure in hand (it raised): no exit, now or for later failures that
    the abandoned work of this iteration reports."""
    with self._error_lock:
      self._disarmed = True
      if self._abort_timer is not None:
        self._abort_timer.cancel()

  def _join(self, thread: threading.Thread) -> None:
    """Joins `thread`, raising `CallFailed` as soon as any call has failed (polled): the exit timer
    only runs out while the main thread is blocked inside JAX, never while it waits here."""
    while thread.is_alive():
      thread.join(0.2)
      self.raise_if_failed()

  def _abort(self) -> None:
    name, e = self._errors[0]
    print(f"real_jax engine: call {name!r} failed on its devices ({type(e).__name__}: {e}) and the main thread "
          f"is still blocked {self.abort_after_s:.0f} s later (calls queued behind a failed program can wait "
          f"forever in a collective); exiting with status {ABORT_EXIT_STATUS}", file=sys.stderr, flush=True)
    os._exit(ABORT_EXIT_STATUS)

  def raise_if_failed(self) -> None:
    """Raises `CallFailed` for the first call that failed on its devices (and stops the abort timer)."""
    if not self._errors:
      return
    self._disarm()
    name, e = self._errors[0]
    others = [n for n, _ in self._errors[1:]]
    raise CallFailed(f"call {name!r} failed on its devices: {type(e).__name__}: {e}" +
                     (f" (also failed: {others})" if others else "")) from e

  def wait(self) -> None:
    """Blocks until every dispatched call has finished (end of an iteration); raises `CallFailed` if
    one failed."""
    for t, _, _ in self._watchers:
      self._join(t)
    self._watchers.clear()
    self.raise_if_failed()

  # -- placement -------------------------------------------------------------------------------

  def params_in(self, model: str, layout: Layout) -> Any:
    """The model's parameters in `layout`, reallocating (and caching) when it differs from home."""
    slot = self.slots[model]
    if slot.offloaded:
      # The planner counts a resting model's memory only while its own call runs: load it once the work
      # before it on those devices is done, not beside that work's buffers (a device_put allocates at once).
      self._wait_for_devices({*range(slot.home.device_mesh.start, slot.home.device_mesh.stop),
                              *range(layout.device_mesh.start, layout.device_mesh.stop)})
      self._restore_from_host(slot)
    if layout == slot.home or self._placed_as_home(slot, layout):
      return slot.params
    key = (slot.version, placement(layout))
    if key not in slot._copies:
      slot._copies.clear()  # Keep at most one copy besides home (JAX keeps it while a call reads it).
      rec = Record(self.iteration, f"{model}:{slot.home}->{layout}", "realloc",
                   (min(slot.home.device_mesh.start, layout.device_mesh.start),
                    max(slot.home.device_mesh.stop, layout.device_mesh.stop) -
                    min(slot.home.device_mesh.start, layout.device_mesh.start)), self.now(),
                   bytes=_tree_bytes(slot.params))
      copy = reallocate_state(slot.params, layout)
      slot._copies[key] = copy
      self.timeline.append(rec)
      self._watch(rec, copy)
    return slot._copies[key]

  def _placed_as_home(self, slot: ModelSlot, layout: Layout) -> bool:
    """Whether `layout` gives every parameter the sharding it has at home (cached per pair of layouts).

    Layouts that differ only in micro-batches, or in an equivalent rule set, place parameters alike:
    the call runs on the home parameters and no reallocation is recorded.
    """
    key = (slot.name, slot.home, layout)
    if key not in self._same_placement:
      leaves = jax.tree.leaves(slot.params)
      targets = jax.tree.leaves(shardings_for(slot.params, layout))
      self._same_placement[key] = len(leaves) == len(targets) and all(
          isinstance(x, jax.Array) and x.sharding == t for x, t in zip(leaves, targets))
    return self._same_placement[key]

  def move_batch(self, arrays: Mapping[str, Any], layout: Layout) -> dict[str, Any]:
    """Batch arrays moved to `layout`'s mesh with the batch axis over (data, fsdp)."""
    out = {}
    for k, x in arrays.items():
      if not isinstance(x, jax.Array):
        out[k] = x
        continue
      target = batch_target(layout, tuple(x.shape))
      if x.sharding == target:
        out[k] = x
      elif isinstance(x.sharding, jax.sharding.NamedSharding):
        out[k] = reallocate(x, target)
      else:  # A small array made on one device (e.g. by jnp on the default device).
        out[k] = jax.device_put(x, target)
    return out

  def offload(self, model: str) -> None:
    """Moves a frozen model's parameters to host memory until its next call.

    Uses the `pinned_host` memory kind, which the GPU and (checked with jax 0.12) the CPU
    backend both offer (`device.addressable_memories()`: device, pinned_host, unpinned_host), so the CPU
    tests exercise this same path (tests/test_runtime_programs.py::test_offload_...).
    """
    slot = self.slots[model]
    if slot.offloaded:
      return
    slot._copies.clear()
    slot.params = jax.tree.map(lambda x: jax.device_put(x, x.sharding.with_memory_kind("pinned_host")), slot.params)
    slot.offloaded = True

  def to_device(self, model: str) -> None:
    """Moves an offloaded model back to device memory (e.g. to checkpoint it); no-op otherwise."""
    slot = self.slots[model]
    if slot.offloaded:
      self._restore_from_host(slot)

  def _restore_from_host(self, slot: ModelSlot) -> None:
    slot.params = jax.tree.map(lambda x: jax.device_put(x, x.sharding.with_memory_kind("device")), slot.params)
    slot.offloaded = False

  # -- execution -------------------------------------------------------------------------------

  def run_iteration(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Runs every call once in topological order; returns all produced keys (dispatched arrays)."""
    data = dict(inputs)
    order = self.graph.order
    last_reader = {(k, _batch_layout(self.plan[n])): i for i, n in enumerate(order) for k in self.graph[n].inputs}
    # Keyed by (key, a later reader's layout without micro-batching: `_batch_layout`).
    pending: dict[tuple[str, Layout], frozenset] = {}  # -> the devices holding the array, until issued
    moved: dict[tuple[str, Layout], Any] = {}  # (key, layout) -> the array moved there, until its last reader
    self._note_moves({k: v for k, v in data.items() if k not in self.graph.producer}, order, pending, moved)
    # The last call reading each model under each (non-home) placement: its copy is dropped after it.
    last_param_reader = {(self.graph[n].model, placement(self.plan[n])): i for i, n in enumerate(order)}
    lanes: list[_Lane] = []  # Train calls being dispatched by their own host threads.

    def finish(lane: _Lane) -> None:
      self._join(lane.thread)
      lanes.remove(lane)
      if lane.error is not None:
        raise lane.error
      self._finish_call(lane.index, lane.name, lane.out, order, pending, moved, data, last_param_reader)

    try:
      self._run_calls(order, data, pending, moved, last_reader, last_param_reader, lanes, finish)
    except BaseException:
      # The iteration is abandoned: lanes still dispatching are left to their (daemon) threads, and
      # the failures their work reports later are not this process's to exit on.
      self._disarm()
      raise
    self.wait()
    self.iteration += 1
    return data

  def _run_calls(self, order, data, pending, moved, last_reader, last_param_reader, lanes, finish) -> None:
    for i, name in enumerate(order):
      self.raise_if_failed()
      call = self.graph[name]
      layout = self.plan[name]
      where = _batch_layout(layout)
      busy = set(layout.device_mesh.devices())
      if call.model in self.slots:
        busy |= set(self.slots[call.model].home.device_mesh.devices())
      for lane in [ln for ln in lanes if ln.conflicts(call, busy)]:
        finish(lane)
      self._issue_moves(data, pending, moved, lambda key, lay, src: src & busy or (lay == where and key in call.inputs))
      params = self.params_in(call.model, layout) if call.model in self.slots else None
      args = self.move_batch({k: moved.get((k, where), data[k]) for k in call.inputs if k in data}, layout)
      for k in call.inputs:
        if last_reader.get((k, where)) == i:
          moved.pop((k, where), None)
      rec = Record(self.iteration, name, "call", (layout.device_mesh.start, layout.device_mesh.size), self.now())
      self.timeline.append(rec)
      if self.concurrent_train and call.kind is CallKind.TRAIN_STEP:
        lanes.append(_Lane(self, i, call, busy, rec, layout, params, args))
        params = args = None
        continue
      out = self._dispatch(call, layout, params, args, rec)
      params = args = None  # Its parameter copy may be dropped below: hold no reference to it here.
      self._finish_call(i, name, out, order, pending, moved, data, last_param_reader)
    while lanes:
      finish(lanes[0])

  def _dispatch(self, call, layout: Layout, params, args, rec: Record) -> dict:
    """Runs the call's function (it dispatches the call's programs) and starts watching its outputs."""
    out = self.functions[call.name](self, call, layout, params, args)
    missing = [k for k in call.outputs if k not in out]
    if missing:
      raise RuntimeError(f"call {call.name!r} did not produce {missing}")
    trained = call.kind is CallKind.TRAIN_STEP and call.model in self.slots
    self._watch(rec, (out, self.slots[call.model].params if trained else None))
    return out

  def _finish_call(self, i: int, name: str, out: dict, order, pending: dict, moved: dict, data: dict,
                   last_param_reader: dict) -> None:
    """After call `i` is dispatched: its outputs join the iteration's data, its parameter copy is
    dropped after its last reader, the moves its outputs need are noted, a frozen model is offloaded."""
    call, where = self.graph[name], placement(self.plan[name])
    data.update(out)
    if call.model in self.slots and last_param_reader[(call.model, where)] == i:
      self.slots[call.model]._copies.pop((self.slots[call.model].version, where), None)
    self._note_moves({k: out[k] for k in call.outputs}, order[i + 1:], pending, moved)
    if call.model in self.slots and call.model in self.plan.offload and call.kind is not CallKind.TRAIN_STEP:
      self._maybe_offload_after(call.model, name)

  def _note_moves(self, produced: Mapping[str, Any], later, pending: dict, moved: dict) -> None:
    """Records the moves the `later` calls will need of the `produced` arrays (issued by `_issue_moves`)."""
    for consumer in later:
      layout = _batch_layout(self.plan[consumer])
      for k in self.graph[consumer].inputs:
        x = produced.get(k)
        if isinstance(x, jax.Array) and (k, layout) not in pending and (k, layout) not in moved:
          pending[(k, layout)] = frozenset(x.sharding.device_set)

  def _issue_moves(self, data: Mapping[str, Any], pending: dict, moved: dict, due: Callable) -> None:
    """Dispatches the pending moves for which `due(key, layout, source devices)` holds, in the order
    they were recorded (the same on every process of a multi-controller run)."""
    for (k, lay), src in list(pending.items()):
      if due(k, lay, src):
        del pending[(k, lay)]
        moved[(k, lay)] = self.move_batch({k: data[k]}, lay)[k]

  def _maybe_offload_after(self, model: str, name: str) -> None:
    later = self.graph.order[self.graph.order.index(name) + 1:]
    if not any(self.graph[c].model == model for c in later):
      self.offload(model)

  def iteration_records(self, iteration: int, *, drop: bool = True) -> list[dict]:
    """The records of `iteration` (all its watchers have finished); `drop` forgets them and any older
    ones, so a long run's timeline stays bounded (the loop writes them to timeline.jsonl)."""
    out = [r.to_dict() for r in self.timeline if r.iteration == iteration]
    if drop:
      self.timeline = [r for r in self.timeline if r.iteration > iteration]
    return out


class _Lane:
  """A train call dispatched by its own host thread (`Engine.concurrent_train`)."""

  def __init__(self, engine: Engine, index: int, call, devices: set, rec: Record, layout: Layout, params, args):
    self.index, self.name, self.call, self.devices = index, call.name, call, devices
    self.out: dict | None = None
    self.error: BaseException | None = None

    def run():
      try:
        self.out = engine._dispatch(call, layout, params, args, rec)
      except BaseException as e:  # noqa: BLE001 (raised by the main thread when it joins the lane)
        self.error = e
    self.thread = threading.Thread(target=run, name=f"real_jax-{call.name}", daemon=True)
    self.thread.start()

  def conflicts(self, call, devices: set) -> bool:
    """Whether `call` must wait until this lane's call is dispatched: it shares a device or the model,
    or reads one of its outputs."""
    return bool(self.devices & devices) or call.model == self.call.model or bool(
        set(call.inputs) & set(self.call.outputs))


def dump_stacks_on_signal(sig: int | None = None) -> bool:
  """Makes `sig` (default SIGUSR1) print every Python thread's stack to stderr, the process going on.

  A process that hangs without a failure (on 4x H200 a plan's first tensor=4 program once waited in
  NCCL's rendezvous for GPU 0 until the call's limit) says where each thread is blocked: the main
  thread in which call's dispatch, the train lanes and watchers in which wait. Send it before killing
  (`timeout -s USR1 -k 15 ...`). False where the platform has no such signal."""
  sig = getattr(signal, "SIGUSR1", None) if sig is None else sig
  if sig is None:
    return False
  faulthandler.register(sig, file=sys.stderr, all_threads=True, chain=False)
  return True


def _batch_layout(layout: Layout) -> Layout:
  """`layout` as far as batch placement goes (micro-batching does not change where rows live)."""
  if layout.strategy.micro_batches == 1:
    return layout
  return dataclasses.replace(layout, strategy=dataclasses.replace(layout.strategy, micro_batches=1))


def batch_target(layout: Layout, shape: tuple[int, ...]) -> jax.sharding.NamedSharding:
  """Where a batch array of `shape` goes under `layout`: rows over data x fsdp, the rest replicated."""
  return activation_sharding(layout, ("batch",) + (None,) * (len(shape) - 1), shape) if shape else layout.replicated()


def check_offload(graph: Graph, plan: ExecutionPlan) -> None:
  """Only frozen models of the graph may rest in host memory (`plan.offload`)."""
  trained = graph.trained_models()
  for model in sorted(plan.offload):
    if model not in graph.models:
      raise ValueError(f"plan offload names {model!r}, which is not a model of the graph {list(graph.models)}")
    if model in trained:
      calls = [c.name for c in graph.calls if c.model == model]
      raise ValueError(f"plan offload names {model!r} (calls {calls}), which is trained; only frozen models may "
                       "rest in host memory")


def check_plan(graph: Graph, plan: ExecutionPlan, params: Mapping[str, Any]) -> None:
  """Every call's layout fits the devices, the model's shapes (heads, ...) and the call's batch.

  params: model -> its parameter state, concrete or abstract (`nnx.state(abstract_model(cfg))`), so
  this runs before any model exists. Errors name the call and its layout.
  """
  n = jax.device_count()
  for call in graph.calls:
    lay = plan[call.name]
    where = f"plan for call {call.name!r} ({lay})"
    if lay.device_mesh.stop > n:
      raise ValueError(f"{where}: mesh needs devices up to id {lay.device_mesh.stop - 1}, but there are {n}")
    if params.get(call.model) is not None:
      try:
        shardings_for(params[call.model], lay)
      except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    shards = lay.strategy.data * lay.strategy.fsdp * lay.strategy.micro_batches
    if call.batch % shards:
      raise ValueError(f"{where}: batch {call.batch} does not divide over data x fsdp x micro_batches = {shards}")


def reallocate_state(state: Any, layout: Layout, *, donate: bool = False) -> Any:
  """An nnx.State (Variables as pytree nodes) reallocated to its shardings under `layout`."""
  leaves, treedef = jax.tree.flatten(state)
  targets = jax.tree.leaves(shardings_for(state, layout))
  return jax.tree.unflatten(treedef, reallocate(leaves, targets, donate=donate))


def home_layouts(graph: Graph, plan: ExecutionPlan) -> dict[str, Layout]:
  """Each model's home: the layout of its last train call, else of its first call."""
  homes = {}
  for model in graph.models:
    calls = [n for n in graph.order if graph[n].model == model]
    if not calls:
      continue
    last_train = graph.last_train_call(model)
    homes[model] = plan[last_train] if last_train else plan[calls[0]]
  return homes


def state_of(model) -> tuple[Any, Any]:
  """(graphdef, params) of an nnx model."""
  return nnx.split(model)

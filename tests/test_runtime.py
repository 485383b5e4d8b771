"""The RLHF runtime end to end: plans, reallocation between calls, config errors, learning."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from real_jax.config import ConfigError
from real_jax.experiment import experiment_from_config
from real_jax.runtime import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import ppo_tiny  # noqa: E402


def small(arg=None, **over):
  c = ppo_tiny.get_config(arg)
  c.num_iterations = 2
  c.sft_warmup_steps = 0
  c.data.batch_size = 16
  c.sampling.max_new_tokens = 4
  for k, v in over.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


@pytest.fixture(scope="module")
def colocated(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("colocated"))
  return run(experiment_from_config(small()), wd, log=lambda *_: None), wd


def test_colocated_run_writes_metrics_and_timeline(colocated):
  rows, wd = colocated
  assert [r["iteration"] for r in rows] == [0, 1]
  lines = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
  assert len(lines) == 2 and {"reward", "kl", "actor/loss", "critic/loss", "time/iteration"} <= set(lines[0])
  assert all(np.isfinite(v) for r in lines for k, v in r.items() if isinstance(v, float))
  tl = [json.loads(x) for x in open(os.path.join(wd, "timeline.jsonl"))]
  names = [r["name"] for r in tl[0]["records"] if r["kind"] == "call"]
  assert names == ["actor_gen", "reward_inf", "ref_inf", "critic_inf", "actor_train", "critic_train"]
  assert all(r["end"] is not None and r["end"] >= r["start"] for r in tl[0]["records"])
  assert not [r for r in tl[0]["records"] if r["kind"] == "realloc"]  # One layout: nothing moves.


def test_split_plan_reallocates_and_matches_colocated(colocated, tmp_path):
  ref_rows, _ = colocated
  rows = run(experiment_from_config(small("plan=split")), str(tmp_path), log=lambda *_: None)
  tl = [json.loads(x) for x in open(tmp_path / "timeline.jsonl")]
  reallocs = [r for r in tl[1]["records"] if r["kind"] == "realloc"]
  assert [r["name"].split(":")[0] for r in reallocs] == ["actor"]  # Train layout -> generation layout.
  calls = {r["name"]: r for r in tl[1]["records"] if r["kind"] == "call"}
  assert calls["actor_gen"]["devices"] == [0, 4] and calls["critic_inf"]["devices"] == [4, 4]
  # Same seed, same math, other layouts: the same rollouts and (to fp32 reduction order) the same losses.
  for a, b in zip(ref_rows, rows):
    assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)
    for k in ("kl", "actor/loss", "critic/loss"):
      assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-4), k


@pytest.mark.parametrize("plan, match", [
    ("actor_gen=0:16/d1f16t1", r"call 'actor_gen'.*devices up to id 15"),
    ("actor_gen=0:8/d1f1t8", r"call 'actor_gen'.*'heads' of size 4 does not divide"),
    ("actor_gen=0:8/d1f8t1m4", r"call 'actor_gen'.*batch 16 does not divide over data x fsdp x micro_batches = 32"),
    ("actor_gen=0:8/d1f8t1, critic_train=0:8/d1f8t1m2", r"call 'critic_train'.*mini-batch of 8 rows"),
])
def test_bad_plans_fail_before_compiling(plan, match, tmp_path):
  base = ("actor_train=0:8/d1f8t1, reward_inf=0:8/d1f8t1, ref_inf=0:8/d1f8t1, critic_inf=0:8/d1f8t1, "
          "critic_train=0:8/d1f8t1, ")
  with pytest.raises(ValueError, match=match):
    run(experiment_from_config(small(plan=base + plan)), str(tmp_path), log=lambda *_: None)


@pytest.mark.parametrize("over, match", [
    ({"ppo.mini_batches": 3}, r"config.ppo.mini_batches=3 does not divide the rows per iteration"),
    ({"data.batch_size": "eight"}, r"config.data.batch_size: expected int"),
    ({"ppo.clip_eps": 2.0}, r"config.ppo: PPOConfig.clip_eps"),
    ({"models.actor.preset": "9b"}, r"config.models.actor.*unknown model preset '9b'"),
])
def test_config_errors_name_the_key(over, match):
  c = small()
  (k, v), = over.items()
  node = c
  *path, last = k.split(".")
  for p in path:
    node = node[p]
  with node.ignore_type():
    node[last] = v
  with pytest.raises(ConfigError, match=match):
    experiment_from_config(c)


def test_unknown_key_is_named():
  c = small()
  c.unlock()
  c.data.batch_sise = 4
  with pytest.raises(ConfigError, match=r"config.data.batch_sise: unknown key"):
    experiment_from_config(c)


def test_cli_rejects_unknown_override(tmp_path):  # A good CLI run: tests/test_resume.py.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "real_jax.train", "--config", os.path.join(ROOT, "configs/ppo_tiny.py"),
         "--workdir", str(tmp_path)]
  bad = subprocess.run(cmd + ["--config.no_such_key=1"], capture_output=True, text=True, env=env, cwd=ROOT)
  assert bad.returncode != 0 and "no_such_key" in bad.stderr


def test_ppo_raises_reward_after_sft(tmp_path):
  """SFT warm-up, then PPO: the mean reward of the last iterations clearly beats the SFT policy's."""
  c = ppo_tiny.get_config()
  c.num_iterations = 40
  rows = run(experiment_from_config(c), str(tmp_path), log=lambda *_: None)
  rewards = np.array([r["reward"] for r in rows])
  start, end = rewards[:5].mean(), rewards[-10:].mean()
  assert end > start + 0.08, (start, end, rewards.round(3).tolist())


def test_cli_multi_host_flags_must_come_together(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "real_jax.train", "--config", os.path.join(ROOT, "configs/ppo_tiny.py"),
         "--workdir", str(tmp_path), "--coordinator_address", "127.0.0.1:1", "--num_processes", "2"]
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert out.returncode != 0 and "missing ['--process_id']" in out.stderr, out.stderr[-2000:]


def test_engine_moves_nothing_between_layouts_that_place_parameters_alike():
  """Micro-batches and equivalent rule sets leave every parameter where it is: no reallocation."""
  from flax import nnx

  from real_jax.dataflow import Call, CallKind, Graph
  from real_jax.models import create_model, get_config
  from real_jax.runtime.engine import Engine, ModelSlot
  from search.plan import ExecutionPlan
  from sharding import DeviceMesh, Layout, Strategy

  home = Layout(DeviceMesh(0, 8), Strategy(fsdp=4, tensor=2))
  _, params = nnx.split(create_model(get_config("tiny"), home))
  slot = ModelSlot("actor", None, params, home)
  graph = Graph([Call("actor_gen", "actor", CallKind.GENERATE)], models=("actor",))
  engine = Engine(graph, ExecutionPlan.colocated(["actor_gen"], home), {"actor": slot},
                  {"actor_gen": lambda *a: {}}, validate=False)
  for same in (Layout(DeviceMesh(0, 8), Strategy(fsdp=4, tensor=2, micro_batches=4)),
               Layout(DeviceMesh(0, 8), Strategy(fsdp=4, tensor=2), "fsdp_tensor")):
    assert engine.params_in("actor", same) is params, same
  other = Layout(DeviceMesh(0, 8), Strategy(data=2, tensor=4))
  moved = engine.params_in("actor", other)
  assert moved is not params and [r.kind for r in engine.timeline] == ["realloc"]


def _three_call_engine(second_on_source: bool):
  """make (devices 0-1) -> x; then a call that does not read x, on make's devices or on the reader's;
  then use (devices 4-7) reads x. Returns the engine, the layouts, and the logs of calls and moves."""
  from real_jax.dataflow import Call, CallKind, Graph
  from real_jax.runtime.engine import Engine
  from search.plan import ExecutionPlan
  from sharding import DeviceMesh, Layout, Strategy

  first, other = Layout(DeviceMesh(0, 2), Strategy(data=2)), Layout(DeviceMesh(4, 4), Strategy(data=2, tensor=2))
  graph = Graph([Call("make", "a", CallKind.GENERATE, ("prompts",), ("x",), batch=4),
                 Call("other_work", "a", CallKind.INFERENCE, ("prompts",), ("y",), batch=4),
                 Call("use", "b", CallKind.INFERENCE, ("x",), ("z",), batch=4)], models=("a", "b"))
  events, moves = [], []

  def fn(out_key, f):
    def call(engine, call, layout, params, args):
      events.append(call.name)
      return {out_key: f(args)}
    return call

  functions = {"make": fn("x", lambda a: a["prompts"] * 2), "other_work": fn("y", lambda a: a["prompts"] + 1),
               "use": fn("z", lambda a: a["x"] - 1)}
  plan = ExecutionPlan({"make": first, "other_work": first if second_on_source else other, "use": other})
  engine = Engine(graph, plan, {}, functions, validate=False)
  move_batch = engine.move_batch

  def logged(arrays, layout):
    moves.append((tuple(sorted(arrays)), layout, len(events)))
    return move_batch(arrays, layout)

  engine.move_batch = logged
  return engine, first, other, events, moves


@pytest.mark.parametrize("second_on_source", [True, False])
def test_engine_moves_a_batch_before_its_source_devices_get_other_work(second_on_source):
  """A copy is ordered behind the work queued on its source and target devices. So x leaves make's
  devices before another call is queued there (not at use's dispatch, behind that call), and if the
  call in between runs on use's devices instead, x moves only at use's dispatch (not before it, which
  would make that unrelated call wait for make)."""
  import jax
  import jax.numpy as jnp

  from sharding import activation_sharding

  engine, first, other, events, moves = _three_call_engine(second_on_source)
  prompts = jax.device_put(jnp.arange(8.0).reshape(4, 2), activation_sharding(first, ("batch", None), (4, 2)))
  data = engine.run_iteration({"prompts": prompts})
  assert events == ["make", "other_work", "use"]
  x_to_other = [n for keys, lay, n in moves if keys == ("x",) and lay == other]
  assert x_to_other and x_to_other[0] == (1 if second_on_source else 2), moves  # (then a no-op at use)
  np.testing.assert_array_equal(np.asarray(data["z"]), np.arange(8.0).reshape(4, 2) * 2 - 1)
  assert {d.id for d in data["z"].sharding.device_set} == {4, 5, 6, 7}


def test_engine_ignores_an_input_that_a_call_produces():
  """A caller's stale value for a produced key never reaches a reader: the produced one does."""
  import jax
  import jax.numpy as jnp

  from sharding import activation_sharding

  engine, first, other, _, _ = _three_call_engine(True)
  prompts = jax.device_put(jnp.arange(8.0).reshape(4, 2), activation_sharding(first, ("batch", None), (4, 2)))
  data = engine.run_iteration({"prompts": prompts, "x": prompts * 0 - 100})
  np.testing.assert_array_equal(np.asarray(data["z"]), np.arange(8.0).reshape(4, 2) * 2 - 1)


@pytest.mark.parametrize("strategy", [dict(data=4), dict(fsdp=2, tensor=2), dict(tensor=4), dict(data=2, fsdp=2)])
def test_take_rows_places_the_mini_batch_as_a_batch_of_the_layout(strategy):
  """One program gathers a mini-batch's rows and leaves them where the train step reads them."""
  import jax

  from real_jax.runtime.engine import batch_target
  from real_jax.runtime.program import take_rows
  from sharding import DeviceMesh, Layout, Strategy

  layout = Layout(DeviceMesh(2, 4), Strategy(**strategy))
  rng = np.random.default_rng(sum(strategy.values()))
  host = {"tokens": rng.integers(0, 50, (16, 6)).astype(np.int32), "adv": rng.normal(size=(16,)).astype(np.float32),
          "mask": rng.random((16, 6)) < 0.5}
  batch = {k: jax.device_put(v, batch_target(layout, v.shape)) for k, v in host.items()}
  idx = np.sort(rng.permutation(16)[:8])
  out = take_rows(batch, idx, layout)
  for k, v in host.items():
    np.testing.assert_array_equal(np.asarray(out[k]), v[idx])
    assert out[k].sharding == batch_target(layout, (8,) + v.shape[1:]), (k, out[k].sharding)
  # The next mini-batch (other rows, an equal but fresh Layout) reuses the compiled gather: no compile per step.
  from real_jax.runtime.program import _gather
  cached = _gather._cache_size()
  again = take_rows(batch, np.sort(rng.permutation(16)[:8]), Layout(DeviceMesh(2, 4), Strategy(**strategy)))
  assert _gather._cache_size() == cached
  assert again["tokens"].sharding == out["tokens"].sharding


def test_ppo_train_batch_is_made_on_the_calls_devices():
  """The per-row kl_coef the PPO train calls add is placed under the call's layout, not on
  jax.devices()[0] (where, in a disaggregated plan, it would queue behind another model's steps)."""
  import types

  import jax

  from real_jax.runtime.engine import batch_target
  from real_jax.runtime.ppo import TRAIN_KEYS, PPOProgram
  from sharding import DeviceMesh, Layout, Strategy

  class Probe(PPOProgram):
    def __init__(self):  # Only what _train reads.
      self.kl_coef, self.config = 0.25, types.SimpleNamespace(ppo_epochs=1, mini_batches=2)

    def train(self, engine, layout, role, loss_fn, batch, **kw):
      self.batch = batch
      return {}

  layout = Layout(DeviceMesh(6, 2), Strategy(data=2))
  args = {k: jax.device_put(np.zeros((4, 3), np.float32), batch_target(layout, (4, 3))) for k in TRAIN_KEYS}
  probe = Probe()
  probe._train(None, layout, args, "critic", None, {})
  kl = probe.batch["kl_coef"]
  assert kl.sharding == batch_target(layout, (4,)), kl.sharding
  np.testing.assert_array_equal(np.asarray(kl), np.full((4,), 0.25, np.float32))


def test_engine_moves_a_batch_once_for_readers_that_differ_only_in_micro_batches(monkeypatch):
  import jax
  import jax.numpy as jnp

  import real_jax.runtime.engine as E
  from real_jax.dataflow import Call, CallKind, Graph
  from search.plan import ExecutionPlan
  from sharding import DeviceMesh, Layout, Strategy, activation_sharding

  src, dst = Layout(DeviceMesh(0, 2), Strategy(data=2)), Layout(DeviceMesh(4, 2), Strategy(data=2))
  dst_m2 = Layout(DeviceMesh(4, 2), Strategy(data=2, micro_batches=2))
  graph = Graph([Call("make", "a", CallKind.GENERATE, ("prompts",), ("x",), batch=4),
                 Call("r1", "b", CallKind.INFERENCE, ("x",), ("y",), batch=4),
                 Call("r2", "b", CallKind.INFERENCE, ("x",), ("z",), batch=4)], models=("a", "b"))
  fns = {"make": lambda e, c, l, p, a: {"x": a["prompts"] + 1}, "r1": lambda e, c, l, p, a: {"y": a["x"] * 2},
         "r2": lambda e, c, l, p, a: {"z": a["x"] * 3}}
  engine = E.Engine(graph, ExecutionPlan({"make": src, "r1": dst, "r2": dst_m2}), {}, fns, validate=False)
  calls = []
  real = E.reallocate
  monkeypatch.setattr(E, "reallocate", lambda x, t, **kw: calls.append(t) or real(x, t, **kw))
  prompts = jax.device_put(jnp.arange(4.0), activation_sharding(src, ("batch",), (4,)))
  data = engine.run_iteration({"prompts": prompts})
  assert len(calls) == 1, calls
  np.testing.assert_array_equal(np.asarray(data["z"]), (np.arange(4.0) + 1) * 3)


def _copy_engine(layouts, **kw):
  """Model m (home: first call's layout) read by calls c0, c1, ... under `layouts`; each call records
  which (version, layout) copies the model holds while it is dispatched."""
  from flax import nnx

  from real_jax.dataflow import Call, CallKind, Graph
  from real_jax.models import create_model, get_config
  from real_jax.runtime.engine import Engine, ModelSlot
  from search.plan import ExecutionPlan

  names = [f"c{i}" for i in range(len(layouts))]
  _, params = nnx.split(create_model(get_config("tiny"), layouts[0]))
  slot = ModelSlot("m", None, params, layouts[0])
  graph = Graph([Call(n, "m", CallKind.INFERENCE) for n in names], models=("m",))
  held = []

  def fn(engine, call, layout, p, args):
    held.append((call.name, sorted(str(k[1].strategy) for k in slot._copies)))
    return {}
  engine = Engine(graph, ExecutionPlan(dict(zip(names, layouts))), {"m": slot}, {n: fn for n in names},
                  validate=False, **kw)
  return engine, slot, held


def test_engine_drops_a_parameter_copy_after_its_last_reader_of_the_iteration():
  """A copy lives from its reallocation to its last reader in the iteration (then the next calls run
  without it: the simulator's memory model); readers that differ only in micro-batches share it."""
  from sharding import DeviceMesh, Layout, Strategy

  home = Layout(DeviceMesh(0, 8), Strategy(fsdp=8))
  t4, t4_m2 = (Layout(DeviceMesh(0, 8), Strategy(data=2, tensor=4, micro_batches=k)) for k in (1, 2))
  engine, slot, held = _copy_engine([home, t4, t4_m2, home])
  engine.run_iteration({})
  t4s = str(t4.strategy)
  assert held == [("c0", []), ("c1", [t4s]), ("c2", [t4s]), ("c3", [])], held
  assert [r.kind for r in engine.timeline].count("realloc") == 1 and not slot._copies
  engine.run_iteration({})  # The next iteration moves it again (it was dropped).
  assert [r.kind for r in engine.timeline].count("realloc") == 2 and not slot._copies


def test_engine_rests_an_offloaded_model_in_host_memory_from_its_start():
  """A frozen model in the plan's offload is in pinned host memory before its first call (the planner counts
  it so: it must not sit on the devices through the first iteration's generation), on the devices while its
  call runs, and back in host memory after it."""
  import jax
  from flax import nnx

  from real_jax.dataflow import Call, CallKind, Graph
  from real_jax.models import create_model, get_config
  from real_jax.runtime.engine import Engine, ModelSlot
  from search.plan import ExecutionPlan
  from sharding import DeviceMesh, Layout, Strategy

  lay = Layout(DeviceMesh(0, 8), Strategy(fsdp=8))
  kinds = lambda tree: {x.sharding.memory_kind for x in jax.tree.leaves(tree)}  # noqa: E731
  slots = {m: ModelSlot(m, None, nnx.split(create_model(get_config("tiny"), lay))[1], lay) for m in ("ref", "actor")}
  graph = Graph([Call("ref_inf", "ref", CallKind.INFERENCE), Call("train", "actor", CallKind.TRAIN_STEP)],
                models=("ref", "actor"))
  during = []
  fns = {n: (lambda engine, call, layout, p, args: during.append((call.name, kinds(p))) or {})
         for n in ("ref_inf", "train")}
  engine = Engine(graph, ExecutionPlan({"ref_inf": lay, "train": lay}, offload={"ref"}), slots, fns, validate=False)
  assert slots["ref"].offloaded and kinds(slots["ref"].params) == {"pinned_host"}
  assert not slots["actor"].offloaded and kinds(slots["actor"].params) == {"device"}
  engine.run_iteration({})
  engine.wait()
  assert during == [("ref_inf", {"device"}), ("train", {"device"})]
  assert slots["ref"].offloaded and kinds(slots["ref"].params) == {"pinned_host"}
  with pytest.raises(ValueError, match=r"offload names 'actor' \(calls \['train'\]\), which is trained"):
    Engine(graph, ExecutionPlan({"ref_inf": lay, "train": lay}, offload={"actor"}), slots, fns, validate=False)


def test_engine_loads_a_resting_model_after_the_work_before_it_on_its_devices(monkeypatch):
  """A resting model comes back to the devices only once the calls dispatched before it there have finished:
  the planner counts its memory only while its own call runs, and a device_put allocates when issued."""
  import time

  import jax
  import jax.numpy as jnp
  from flax import nnx

  import real_jax.runtime.engine as E
  from real_jax.dataflow import Call, CallKind, Graph
  from real_jax.models import create_model, get_config
  from search.plan import ExecutionPlan
  from sharding import DeviceMesh, Layout, Strategy

  lay = Layout(DeviceMesh(0, 8), Strategy(fsdp=8))
  slots = {m: E.ModelSlot(m, None, nnx.split(create_model(get_config("tiny"), lay))[1], lay) for m in ("ref", "actor")}
  graph = Graph([Call("gen", "actor", CallKind.INFERENCE, outputs=("x",)),
                 Call("ref_inf", "ref", CallKind.INFERENCE, inputs=("x",))], models=("ref", "actor"))

  fns = {"gen": lambda engine, call, layout, p, args: {"x": jnp.ones((8,))},
         "ref_inf": lambda engine, call, layout, p, args: {}}
  ready = jax.block_until_ready

  def slow_gen(tree):  # gen's outputs take 0.5 s to be ready (a CPU program this small is done at dispatch)
    if isinstance(tree, tuple) and isinstance(tree[0], dict) and "x" in tree[0]:
      time.sleep(0.5)
    return ready(tree)
  monkeypatch.setattr(E.jax, "block_until_ready", slow_gen)
  engine = E.Engine(graph, ExecutionPlan({"gen": lay, "ref_inf": lay}, offload={"ref"}), slots, fns, validate=False)
  gen_done = []
  real = E.Engine._restore_from_host
  monkeypatch.setattr(E.Engine, "_restore_from_host",
                      lambda self, slot: gen_done.append(self.timeline[0].end is not None) or real(self, slot))
  engine.run_iteration({})
  assert gen_done == [True]


def test_engine_raises_a_call_that_failed_on_its_devices(monkeypatch):
  import real_jax.runtime.engine as E
  from sharding import DeviceMesh, Layout, Strategy

  lay = Layout(DeviceMesh(0, 8), Strategy(fsdp=8))
  engine, _, _ = _copy_engine([lay, lay])
  engine.functions["c0"] = lambda *a: {"marker": "c0"}  # Its outputs, as the watcher sees them.
  real = E.jax.block_until_ready

  def fail_c0(tree):
    if isinstance(tree, tuple) and isinstance(tree[0], dict) and tree[0].get("marker") == "c0":
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 13.15GiB")
    return real(tree)
  monkeypatch.setattr(E.jax, "block_until_ready", fail_c0)
  with pytest.raises(E.CallFailed, match="call 'c0' failed on its devices: RuntimeError: RESOURCE_EXHAUSTED"):
    engine.run_iteration({})


def test_engine_exits_when_the_main_thread_stays_blocked_after_a_device_failure(monkeypatch):
  """The main thread stuck in JAX behind a failed program never reaches `wait`: the engine exits."""
  import threading

  import real_jax.runtime.engine as E
  from sharding import DeviceMesh, Layout, Strategy

  lay = Layout(DeviceMesh(0, 8), Strategy(fsdp=8))
  engine, _, _ = _copy_engine([lay], abort_after_s=0.05)
  exited = threading.Event()
  monkeypatch.setattr(E.os, "_exit", lambda status: exited.set() if status == E.ABORT_EXIT_STATUS else None)
  engine._failed("actor_train", RuntimeError("out of memory"))
  assert exited.wait(5.0)
  # Raised in time by the main thread, the error cancels the exit.
  engine, _, _ = _copy_engine([lay], abort_after_s=0.5)
  exited.clear()
  engine._failed("c0", RuntimeError("out of memory"))
  with pytest.raises(E.CallFailed, match="'c0'"):
    engine.wait()
  assert not exited.wait(1.0)


@pytest.mark.parametrize("concurrent", [True, False])
def test_engine_dispatches_other_calls_while_a_train_call_holds_its_thread(concurrent):
  """A train call whose host blocks (on GPU: each step's dispatch waits for the step before it) does
  not hold back a later call on other devices; a call reading its output waits for it."""
  import threading

  import jax
  import jax.numpy as jnp

  from real_jax.dataflow import Call, CallKind, Graph
  from real_jax.runtime.engine import Engine
  from search.plan import ExecutionPlan
  from sharding import DeviceMesh, Layout, Strategy, activation_sharding

  a, b = Layout(DeviceMesh(0, 4), Strategy(data=4)), Layout(DeviceMesh(4, 4), Strategy(data=4))
  graph = Graph([Call("train", "a", CallKind.TRAIN_STEP, ("x",), ("a_stats",), batch=4),
                 Call("other", "b", CallKind.INFERENCE, ("x",), ("y",), batch=4),
                 Call("after", "c", CallKind.INFERENCE, ("a_stats", "y"), ("z",), batch=4)], models=("a", "b", "c"),
                external=("x",))
  release, events = threading.Event(), []

  def train(engine, call, layout, params, args):
    events.append("train start")
    if concurrent:
      assert release.wait(10), "the call on other devices was not dispatched while train held its thread"
    events.append("train end")
    return {"a_stats": args["x"] * 2}

  def other(engine, call, layout, params, args):
    events.append("other")
    release.set()
    return {"y": args["x"] + 1}

  def after(engine, call, layout, params, args):
    events.append("after")
    return {"z": args["a_stats"] + args["y"]}
  engine = Engine(graph, ExecutionPlan({"train": a, "other": b, "after": b}), {},
                  {"train": train, "other": other, "after": after}, validate=False, concurrent_train=concurrent)
  x = jax.device_put(jnp.arange(4.0), activation_sharding(a, ("batch",), (4,)))
  data = engine.run_iteration({"x": x})
  if concurrent:  # (the lane's thread may start its function after "other" is dispatched)
    assert events.index("other") < events.index("train end") < events.index("after") == 3, events
  else:
    assert events == ["train start", "train end", "other", "after"]
  np.testing.assert_array_equal(np.asarray(data["z"]), np.arange(4.0) * 3 + 1)
  assert [r.name for r in engine.timeline] == ["train", "other", "after"] and all(r.end for r in engine.timeline)


def test_engine_failure_paths_raise_promptly_and_never_exit_once_raised(monkeypatch):
  """The main thread waiting on other work raises a failure within a poll, not after the exit timer;
  once it has raised (CallFailed, or any error of a lane), later failures of the abandoned work do not
  exit the process."""
  import threading
  import time

  import real_jax.runtime.engine as E
  from sharding import DeviceMesh, Layout, Strategy

  exits = []
  monkeypatch.setattr(E.os, "_exit", exits.append)
  lay = Layout(DeviceMesh(0, 8), Strategy(fsdp=8))
  engine, _, _ = _copy_engine([lay], abort_after_s=0.3)
  slow = threading.Thread(target=time.sleep, args=(3.0,), daemon=True)
  slow.start()
  engine._watchers.append((slow, 0, 8))  # (watcher, its record's devices)
  threading.Timer(0.1, engine._failed, ("c9", RuntimeError("out of memory"))).start()
  t = time.perf_counter()
  with pytest.raises(E.CallFailed, match="'c9'"):
    engine.wait()
  assert time.perf_counter() - t < 1.5
  engine._failed("c10", RuntimeError("error passed on to a reader"))  # After the raise: no exit.
  time.sleep(0.6)
  assert exits == []

  # A lane's own error (raised when dispatching) abandons the iteration and disarms the engine too.
  from real_jax.dataflow import Call, CallKind, Graph
  from search.plan import ExecutionPlan

  graph = Graph([Call("t", "m", CallKind.TRAIN_STEP)], models=("m",))

  def bad(*a):
    raise ValueError("bad batch")
  engine = E.Engine(graph, ExecutionPlan({"t": lay}), {}, {"t": bad}, validate=False, abort_after_s=0.3,
                    concurrent_train=True)
  with pytest.raises(ValueError, match="bad batch"):
    engine.run_iteration({})
  engine._failed("t", RuntimeError("late"))
  time.sleep(0.6)
  assert exits == []


def test_sigusr1_prints_every_threads_stack_and_the_process_goes_on():
  """`dump_stacks_on_signal` (real_jax.train and bench/plans.py install it): a hung run says where each
  thread waits, and the process is not stopped by the signal."""
  import signal
  import subprocess
  import sys
  if not hasattr(signal, "SIGUSR1"):
    pytest.skip("no SIGUSR1 on this platform")
  code = ("import os, signal, threading, time\n"
          "from real_jax.runtime.engine import dump_stacks_on_signal\n"
          "assert dump_stacks_on_signal()\n"
          "def waiting_lane():\n  time.sleep(30)\n"
          "threading.Thread(target=waiting_lane, daemon=True).start()\n"
          "time.sleep(0.2)\n"
          "os.kill(os.getpid(), signal.SIGUSR1)\n"
          "time.sleep(0.2)\n"
          "print('still running')\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "still running"
  assert "in waiting_lane" in out.stderr and "Current thread" in out.stderr, out.stderr[-2000:]

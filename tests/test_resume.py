"""Checkpoints and metrics wired into the loop: kill and resume, resume under another plan, the NaN
guard, TensorBoard events.

Compile cost drives the shape: the in-process tests share one 3-iteration colocated run (module
fixture) and its compiled programs; the CLI kill/resume test runs three subprocesses that share a
persistent compilation cache, so only the first one compiles.
"""

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from real_jax.checkpoint import Checkpointer
from real_jax.experiment import experiment_from_config
from real_jax.metrics import NonFiniteError, read_jsonl, read_scalars
from real_jax.runtime import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import ppo_tiny  # noqa: E402

QUIET = dict(log=lambda *_: None, progress=False)


def small(arg=None, **over):
  c = ppo_tiny.get_config(arg)
  c.num_iterations = 3
  c.checkpoint_every = 1
  c.sft_warmup_steps = 0
  c.data.batch_size = 16
  c.sampling.max_new_tokens = 4
  for k, v in over.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return experiment_from_config(c)


def same_keys(a: dict, b: dict) -> list[str]:
  """Keys whose values differ, timings aside."""
  keys = (set(a) | set(b)) - {k for k in set(a) | set(b) if k.startswith("time/")}
  return sorted(k for k in keys if a.get(k) != b.get(k))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("base"))
  rows = run(small(), wd, **QUIET)
  return rows, wd


def _restore(wd: str, step: int, exp):
  """The checkpoint's arrays as NumPy, restored through the same templates a run builds."""
  ckpt = Checkpointer(wd, every=0, config=exp)
  meta = ckpt.read_meta(step)
  from real_jax.runtime.loop import abstract_slots
  slots, homes = abstract_slots(exp)
  r = ckpt.restore(step, homes, like=slots)
  ckpt.close()
  out = {role: jax.tree.map(np.asarray, jax.tree.leaves(p)) for role, p in r.params.items()}
  out.update({f"{role}/opt": [np.asarray(x) for x in jax.tree.leaves(t.opt_state)] for role, t in
              r.train_states.items()})
  return out, meta


def test_checkpoints_metrics_and_tensorboard(base):
  rows, wd = base
  assert [r["iteration"] for r in rows] == [0, 1, 2]
  assert Checkpointer(wd, every=0).all_steps() == [1, 2, 3]
  lines = read_jsonl(os.path.join(wd, "metrics.jsonl"))
  assert [r["iteration"] for r in lines] == [0, 1, 2]
  # TensorBoard event files beside metrics.jsonl hold the same scalars (float32).
  scalars = read_scalars(wd)
  assert sorted(scalars) == [0, 1, 2]
  for row in lines:
    got = scalars[row["iteration"]]
    num = {k: v for k, v in row.items() if k != "iteration" and isinstance(v, (int, float))}
    assert set(got) == set(num)
    for k, v in num.items():
      assert got[k] == pytest.approx(np.float32(v), rel=1e-6, abs=1e-30), k
  meta = Checkpointer(wd, every=0).read_meta(3)
  assert meta["extra"]["iteration"] == 3 and set(meta["extra"]["program"]) == {"kl_coef"}
  assert meta["extra"]["data"]["position"] == 3 * 16


def test_resume_under_another_plan(base, tmp_path):
  """Checkpoint 2 of the colocated run, resumed under the split plan (fingerprint excludes the plan)."""
  rows, wd = base
  shutil.copytree(os.path.join(wd, "checkpoints", "2"), tmp_path / "checkpoints" / "2")
  logs = []
  out = run(small("plan=split"), str(tmp_path), log=logs.append, progress=False)
  assert any("resumed from checkpoint" in str(m) for m in logs)
  assert [r["iteration"] for r in out] == [2]
  a, b = rows[2], out[0]
  assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)
  for k in ("kl", "actor/loss", "critic/loss", "kl_coef"):
    assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-4), k
  assert Checkpointer(str(tmp_path), every=0).all_steps() == [2, 3]


def _poison_actor_optimizer(at: int):
  """A callback that makes the actor's optimizer state NaN after iteration `at` (as a diverging
  optimizer would): the next actor_train reports a NaN loss."""

  def cb(it, metrics, state):
    if it == at:
      slot = state.engine.slots["actor"]
      bad = jax.tree.map(lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x,
                         slot.train_state.opt_state)
      slot.train_state = dataclasses.replace(slot.train_state, opt_state=bad) if dataclasses.is_dataclass(
          slot.train_state) else slot.train_state.replace(opt_state=bad)

  return cb


def test_non_finite_stops_the_run_and_keeps_the_last_checkpoint(base, tmp_path):
  rows, wd = base
  exp = small()
  with pytest.raises(NonFiniteError, match=r"call 'actor_train' at iteration 2") as e:
    run(exp, str(tmp_path), callbacks=[_poison_actor_optimizer(1)], **QUIET)
  assert e.value.call == "actor_train" and e.value.iteration == 2 and any(k.startswith("actor/") for k in e.value.bad)
  assert [r["iteration"] for r in read_jsonl(str(tmp_path / "metrics.jsonl"))] == [0, 1]
  assert Checkpointer(str(tmp_path), every=0).all_steps() == [1, 2]
  # The last good checkpoint is intact: it restores, and equals the uninterrupted run's step 2.
  got, meta = _restore(str(tmp_path), 2, exp)
  want, _ = _restore(wd, 2, exp)
  assert meta["extra"]["iteration"] == 2
  for role in want:
    for x, y in zip(got[role], want[role]):
      np.testing.assert_array_equal(x, y, err_msg=role)


# -- the CLI, killed between checkpoints ---------------------------------------------------------

CLI = [sys.executable, "-m", "real_jax.train", "--config", os.path.join(ROOT, "configs", "ppo_tiny.py"),
       "--config.num_iterations=4", "--config.checkpoint_every=2", "--config.sft_warmup_steps=0",
       "--config.data.batch_size=16", "--config.sampling.max_new_tokens=4"]


def _env(cache: str) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             JAX_DEFAULT_MATMUL_PRECISION="highest", JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             PYTHONPATH=ROOT)
  return env


def _cli(workdir: str, env: dict, timeout: float = 900) -> str:
  p = subprocess.run(CLI + [f"--workdir={workdir}"], env=env, cwd=ROOT, capture_output=True, text=True,
                     timeout=timeout)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
  return p.stdout + p.stderr


def test_cli_killed_between_checkpoints_resumes_to_the_same_metrics(tmp_path):
  env = _env(str(tmp_path / "jax_cache"))
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  _cli(a, env)  # Uninterrupted (and fills the compilation cache for the runs below).
  rows_a = read_jsonl(os.path.join(a, "metrics.jsonl"))
  assert [r["iteration"] for r in rows_a] == [0, 1, 2, 3]
  assert Checkpointer(a, every=0).all_steps() == [2, 4]

  # Killed between checkpoints: checkpoint 2 exists (saved asynchronously: under load it can land after
  # iteration 3 is logged too), checkpoint 4 does not, and iteration 2 (and maybe 3) is in metrics but
  # not saved.
  log = open(tmp_path / "b.log", "w")
  p = subprocess.Popen(CLI + [f"--workdir={b}"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  ckpt2, ckpt4 = (os.path.join(b, "checkpoints", s) for s in ("2", "4"))
  deadline = time.monotonic() + 900
  try:
    while True:
      n = len(read_jsonl(os.path.join(b, "metrics.jsonl")))
      if n >= 3 and os.path.isdir(ckpt2) and not os.path.exists(ckpt4):
        p.send_signal(signal.SIGKILL)
        break
      assert not os.path.exists(ckpt4) and p.poll() is None and time.monotonic() < deadline, \
          f"run B was not caught between checkpoints (rows {n}, rc {p.poll()}): " + open(tmp_path / "b.log").read()[-3000:]
      time.sleep(0.01)
  finally:
    p.wait(timeout=60)
    log.close()
  assert p.returncode == -signal.SIGKILL
  assert len(read_jsonl(os.path.join(b, "metrics.jsonl"))) in (3, 4)
  assert Checkpointer(b, every=0).all_steps() == [2]

  out = _cli(b, env)  # The same command again: resumes from 2, drops the unsaved rows (2, maybe 3), finishes.
  assert "resumed from checkpoint" in out and "iteration 2 runs next" in out
  rows_b = read_jsonl(os.path.join(b, "metrics.jsonl"))
  assert [r["iteration"] for r in rows_b] == [0, 1, 2, 3]
  for ra, rb in zip(rows_a, rows_b):
    assert same_keys(ra, rb) == [], (ra, rb)
  assert sorted(read_scalars(b)) == [0, 1, 2, 3]
  assert Checkpointer(b, every=0).all_steps() == [2, 4]


def test_offloaded_frozen_model_is_checkpointed(base, tmp_path):
  """The reference rests in host memory between its calls; checkpoints still hold it (moved back to
  the devices to save), equal to the colocated run's, and the run's metrics are unchanged."""
  rows, wd = base
  calls = ("actor_gen", "reward_inf", "ref_inf", "critic_inf", "actor_train", "critic_train")
  plan = ", ".join(f"{c}=0:8/d1f8t1" for c in calls) + ", offload=ref"
  exp = small(plan=plan, num_iterations=2)
  out = run(exp, str(tmp_path), **QUIET)
  for a, b in zip(rows, out):
    assert same_keys(a, b) == [], (a, b)
  got, _ = _restore(str(tmp_path), 2, exp)
  want, _ = _restore(wd, 2, small())
  for x, y in zip(got["ref"], want["ref"]):
    np.testing.assert_array_equal(x, y)


def test_a_resumed_run_rests_offloaded_models_again(tmp_path, monkeypatch):
  """A resume restores the reference onto the devices; it goes back to host memory before the first resumed
  iteration starts (the planner counts it resting through generation) and rests at every iteration's start."""
  import jax

  from real_jax.runtime.engine import Engine
  calls = ("actor_gen", "reward_inf", "ref_inf", "critic_inf", "actor_train", "critic_train")
  plan = ", ".join(f"{c}=0:8/d1f8t1" for c in calls) + ", offload=ref"
  run(small(plan=plan, num_iterations=1), str(tmp_path), **QUIET)
  seen = []
  real = Engine.run_iteration

  def spy(self, inputs):
    slot = self.slots["ref"]
    seen.append((slot.offloaded, {x.sharding.memory_kind for x in jax.tree.leaves(slot.params)}))
    return real(self, inputs)
  monkeypatch.setattr(Engine, "run_iteration", spy)
  out = run(small(plan=plan, num_iterations=3), str(tmp_path), **QUIET)
  assert [r["iteration"] for r in out] == [1, 2]
  assert seen == [(True, {"pinned_host"})] * 2, seen

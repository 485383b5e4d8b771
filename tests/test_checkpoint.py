"""Checkpointer: round trips, restore under another layout, async + retention, atomicity (tmp dirs,
SIGKILL during a save), config fingerprints, and error messages that name the path and item."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax import nnx

from real_jax.checkpoint import Checkpointer, CheckpointError, ConfigMismatchError, fingerprint
from real_jax.models import abstract_model, create_model, get_config
from real_jax.optim import OptimizerConfig
from real_jax.train_step import init_train_state
from sharding import Layout, shardings_for

ROOT = Path(__file__).resolve().parents[1]
CFG = get_config("tiny")
OPT = OptimizerConfig(lr=1e-3)
FSDP8 = Layout.on(0, fsdp=8)
D2T2 = Layout.on(4, data=2, tensor=2)  # Other devices, other axes, half the device count.
EXTRA = {"iteration": 3, "data": {"seed": 0, "epoch": 1, "position": 24, "size": None}, "rng": {"seed": 7},
         "kl_coef": 0.123456789012345}


def _abstract_train_state(layout):
  """The tiny model's TrainState as ShapeDtypeStructs (traced, never compiled: fast on busy CPUs)."""
  return jax.eval_shape(lambda: init_train_state(create_model(CFG, layout, seed=1), OPT, layout))


def _filled(abstract, layout, seed):
  """`abstract` with every leaf made from NumPy values in its shardings under `layout`.

  Returns (tree, host references): references that never came from a device, distinct per leaf
  (so moments, counters and the step are all non-trivial).
  """
  leaves, treedef = jax.tree.flatten(abstract)
  shardings = jax.tree.leaves(shardings_for(abstract, layout))
  rng = np.random.default_rng(seed)
  refs = [(rng.standard_normal(x.shape) * 10).astype(x.dtype) for x in leaves]
  new = [jax.make_array_from_callback(r.shape, s, lambda i, r=r: r[i], dtype=r.dtype)
         for s, r in zip(shardings, refs)]
  return jax.tree.unflatten(treedef, new), refs


def _slots(layout=FSDP8):
  """An actor with a TrainState and a frozen ref (params only); plus host references."""
  abstract = _abstract_train_state(layout)
  ts, ts_ref = _filled(abstract, layout, 10)
  ref_params, ref_ref = _filled(abstract.params, layout, 11)
  slots = {"actor": SimpleNamespace(params=ts.params, train_state=ts),
           "ref": SimpleNamespace(params=ref_params, train_state=None)}
  return slots, {"actor": ts_ref, "ref": ref_ref}


def _abstract_like(layout):
  """Templates with no arrays at all (what a resumed run on other devices would pass)."""
  ts = _abstract_train_state(layout)
  return {"actor": SimpleNamespace(params=ts.params, train_state=ts),
          "ref": SimpleNamespace(params=nnx.state(abstract_model(CFG)), train_state=None)}


def _assert_restored(tree, refs, layout):
  leaves = jax.tree.leaves(tree)
  want_sh = jax.tree.leaves(shardings_for(tree, layout))
  assert len(leaves) == len(refs) == len(want_sh)
  for x, r, sh in zip(leaves, refs, want_sh):
    assert x.sharding.is_equivalent_to(sh, x.ndim), (x.sharding, sh)
    assert x.dtype == r.dtype
    for shard in x.addressable_shards:  # Bitwise: compare the raw bytes of every shard.
      np.testing.assert_array_equal(np.asarray(shard.data).reshape(-1).view(np.uint8),
                                    np.asarray(r[shard.index]).reshape(-1).view(np.uint8))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """One checkpoint at step 3 (FSDP over 8 devices), shared by the restore tests."""
  workdir = str(tmp_path_factory.mktemp("run"))
  slots, refs = _slots()
  ck = Checkpointer(workdir, every=3, config={"seed": 0, "plan": "colocated"})
  assert ck.save(3, slots, EXTRA)
  ck.close()
  return workdir, slots, refs


def test_round_trip_same_layout(saved):
  workdir, slots, refs = saved
  ck = Checkpointer(workdir, every=3, config={"seed": 0, "plan": "colocated"})
  assert ck.latest_step() == 3
  r = ck.restore(None, {"actor": FSDP8, "ref": FSDP8}, like=slots)
  assert r.step == 3 and r.extra == EXTRA
  assert type(r.train_states["actor"]) is type(slots["actor"].train_state)
  assert r.params["actor"] is r.train_states["actor"].params
  assert isinstance(r.params["ref"], nnx.State) and "ref" not in r.train_states
  _assert_restored(r.train_states["actor"], refs["actor"], FSDP8)
  _assert_restored(r.params["ref"], refs["ref"], FSDP8)
  ck.close()


def test_restore_under_another_layout_from_abstract_templates(saved):
  """fsdp=8 -> data=2 x tensor=2 on devices 4..7; the plan's `plan` key may change (not fingerprinted)."""
  workdir, _, refs = saved
  ck = Checkpointer(workdir, every=3, config={"seed": 0, "plan": "actor_gen=4:4/d2f1t2"})
  r = ck.restore(3, {"actor": D2T2, "ref": Layout.on(0, tensor=2)}, like=_abstract_like(D2T2))
  _assert_restored(r.train_states["actor"], refs["actor"], D2T2)
  _assert_restored(r.params["ref"], refs["ref"], Layout.on(0, tensor=2))
  assert {d.id for x in jax.tree.leaves(r.train_states["actor"]) for d in x.sharding.device_set} == {4, 5, 6, 7}
  ck.close()


def test_async_save_retention_and_due(tmp_path):
  slots, refs = _slots()
  ck = Checkpointer(str(tmp_path), every=2, max_to_keep=2, async_save=True)
  assert not ck.save(1, slots, {"iteration": 1})  # Not due.
  for step in (2, 4, 6):
    assert ck.save(step, slots, {"iteration": step})
  assert ck.save(7, slots, {"iteration": 7}, force=True)  # The end of a run.
  assert not ck.save(7, slots, {"iteration": 7}, force=True)  # Already there: no error, no rewrite.
  ck.wait_until_finished()
  assert ck.all_steps() == [6, 7] and ck.latest_step() == 7
  r = ck.restore(7, {"actor": FSDP8, "ref": FSDP8}, like=slots)
  assert r.extra == {"iteration": 7}
  _assert_restored(r.train_states["actor"], refs["actor"], FSDP8)
  ck.close()


def test_tmp_and_corrupt_directories(saved, tmp_path):
  workdir, slots, _ = saved
  ckdir = Path(workdir) / "checkpoints"
  tmp = ckdir / "9.orbax-checkpoint-tmp"  # What a killed save leaves (older orbax: + a timestamp).
  (tmp / "actor").mkdir(parents=True)
  (tmp / "actor" / "junk").write_text("partial")
  ck = Checkpointer(workdir, every=3)
  assert ck.latest_step() == 3 and ck.all_steps() == [3]
  ck.wait_until_finished()
  assert not tmp.exists(), "opening the directory cleans up unfinished saves"
  ck.close()
  # A complete-looking step whose items are gone: the error names the path and the missing item.
  bad = tmp_path / "bad"
  ck = Checkpointer(str(bad), every=1)
  ck.save(1, slots, {})
  ck.close()
  shutil.rmtree(bad / "checkpoints" / "1" / "meta")
  ck = Checkpointer(str(bad), every=1)
  with pytest.raises(CheckpointError, match=rf"{bad}/checkpoints/1: missing item 'meta'"):
    ck.restore(1, {"actor": FSDP8, "ref": FSDP8}, like=slots)
  with pytest.raises(CheckpointError, match=r"checkpoints/2: no such complete step"):
    ck.restore(2, {"actor": FSDP8}, like=slots)
  ck.close()


def test_missing_role_and_structure_errors(saved):
  workdir, slots, _ = saved
  ck = Checkpointer(workdir, every=3)
  critic = SimpleNamespace(params=slots["ref"].params, train_state=None)
  with pytest.raises(CheckpointError, match=r"checkpoints/3: missing item\(s\) \['critic'\]"):
    ck.restore(3, {"critic": FSDP8}, like={"critic": critic})
  with pytest.raises(CheckpointError, match=r"model 'actor' was saved with a TrainState but the template has none"):
    ck.restore(3, {"actor": FSDP8}, like={"actor": SimpleNamespace(params=slots["actor"].params, train_state=None)})
  other = nnx.state(abstract_model(get_config("tiny", n_layers=3)))
  with pytest.raises(CheckpointError, match=r"item 'ref': leaf 'params/layers/\w+' has shape"):
    ck.restore(3, {"ref": FSDP8}, like={"ref": SimpleNamespace(params=other, train_state=None)})
  ck.close()


def test_config_fingerprint(saved):
  workdir, slots, _ = saved
  assert fingerprint({"seed": 0, "plan": "a", "num_iterations": 5}) == fingerprint({"seed": 0, "plan": "b"})
  ck = Checkpointer(workdir, every=3, config={"seed": 1, "plan": "colocated"})
  with pytest.raises(ConfigMismatchError, match=r"checkpoints/3 was written by another experiment(.|\n)*"
                     r"config.seed: checkpoint 0 != now 1"):
    ck.restore(3, {"ref": FSDP8}, like=slots)
  ck.close()
  ck = Checkpointer(workdir, every=3, config={"seed": 1}, on_mismatch="warn")
  assert ck.restore(3, {"ref": FSDP8}, like=slots).step == 3
  ck.close()


_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, os.path.join(sys.argv[2], "tests"))
    import jax, jax.numpy as jnp
    from types import SimpleNamespace
    from test_checkpoint import FSDP8, _slots
    from real_jax.checkpoint import Checkpointer
    slots, _ = _slots()
    ck = Checkpointer(sys.argv[1], every=1)
    ck.save(1, slots, {"iteration": 1})
    ck.wait_until_finished()
    big = jax.device_put(jnp.ones((4096, 2048), jnp.float32), FSDP8.named("fsdp"))  # 32 MiB: a slow write
    ck.save(2, {**slots, "big": SimpleNamespace(params={"w": big}, train_state=None)}, {"iteration": 2})
    print("LISTING", sorted(os.listdir(ck.directory)), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # While the asynchronous save is still writing.
""")


def test_sigkill_during_async_save_keeps_previous_checkpoint(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  p = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(tmp_path), str(ROOT)], env=env, capture_output=True,
                     text=True, timeout=240)
  assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
  listing = next(line for line in p.stdout.splitlines() if line.startswith("LISTING"))
  ck = Checkpointer(str(tmp_path), every=1)
  ck.wait_until_finished()
  if "tmp" in listing:  # The usual case: killed mid-write, so step 2 must not exist.
    assert ck.all_steps() == [1], listing
  assert not [d for d in os.listdir(ck.directory) if "tmp" in d]
  slots, refs = _slots()  # The same NumPy values the killed process saved.
  r = ck.restore(1, {"actor": D2T2, "ref": FSDP8}, like=_abstract_like(D2T2))
  assert r.extra == {"iteration": 1}
  _assert_restored(r.train_states["actor"], refs["actor"], D2T2)
  _assert_restored(r.params["ref"], refs["ref"], FSDP8)
  ck.close()


# -- multi-process: 2 processes x 4 CPU devices <-> 1 process x 8 --------------------------------


def _mp(mode, workdir, actor, ref, n):
  from _mp_launch import launch
  results = launch(ROOT / "tests" / "_ckpt_mp_worker.py", [mode, workdir, actor, ref], num_processes=n,
                   devices_per_process=8 // n, timeout=180)
  return results


def _ok(results):
  for r in results:
    assert r.returncode == 0 and f"RESULT process={r.process_id} ok" in r.output, r.output[-4000:]


@pytest.mark.slow
def test_two_process_checkpoint_restores_in_one_process(tmp_path):
  _ok(_mp("save", str(tmp_path), "0:8/d1f8t1", "0:8/d2f2t2", 2))  # Arrays straddle both processes.
  _ok(_mp("restore", str(tmp_path), "4:4/d2f1t2", "0:2/d1f1t2", 1))


@pytest.mark.slow
def test_one_process_checkpoint_restores_in_two_processes(tmp_path):
  _ok(_mp("save", str(tmp_path), "0:8/d2f2t2", "0:4/d1f4t1", 1))
  _ok(_mp("restore", str(tmp_path), "0:8/d1f8t1", "2:4/d1f2t2", 2))  # ref: devices 2..5, on both processes.
  # A target on process 1's devices only cannot be restored by orbax 0.12: a clear error, no hang.
  results = _mp("restore", str(tmp_path), "0:8/d1f8t1", "4:4/d1f4t1", 2)
  for r in results:
    assert r.returncode == 1 and "has devices of processes [1] only" in r.output, r.output[-3000:]

"""The loop as 2 processes x 4 CPU devices (jax.distributed, gloo) vs 1 process x 8 devices: the same
metrics, and checkpoints that restore across the two (tests/_runtime_mp_worker.py).

Four launches, each compiling the tiny PPO programs; the launches of one process count share a
persistent compilation cache.
"""

import ast
import os
import shutil

import pytest

from _mp_launch import launch
from real_jax.metrics import read_jsonl
from search.plan import ExecutionPlan

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_runtime_mp_worker.py")
KEYS = ("reward", "kl", "kl_coef", "response_len", "no_eos_frac", "actor/loss", "critic/loss")


def _run(workdir, n_iter, nproc, cache):
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  try:
    res = launch(WORKER, [workdir, n_iter], num_processes=nproc, devices_per_process=8 // nproc, timeout=900)
  finally:
    for k in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
      os.environ.pop(k, None)
  for r in res:
    assert r.returncode == 0 and f"RESULT process={r.process_id} ok" in r.output, r.output[-4000:]
  return read_jsonl(os.path.join(workdir, "metrics.jsonl")), res[0].output


def _close(a, b):
  for k in KEYS:
    assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (k, a[k], b[k])


def test_two_processes_match_one_and_checkpoints_cross(tmp_path):
  mp, sp = str(tmp_path / "mp"), str(tmp_path / "sp")
  rows_mp, _ = _run(mp, 2, 2, str(tmp_path / "cache2"))
  rows_sp, _ = _run(sp, 3, 1, str(tmp_path / "cache1"))
  assert [r["iteration"] for r in rows_mp] == [0, 1] and [r["iteration"] for r in rows_sp] == [0, 1, 2]
  for a, b in zip(rows_mp, rows_sp):
    _close(a, b)
  # The 2-process checkpoint 2 resumed by 1 process, and the 1-process checkpoint 2 by 2 processes.
  x, y = tmp_path / "mp_to_sp", tmp_path / "sp_to_mp"
  shutil.copytree(os.path.join(mp, "checkpoints", "2"), x / "checkpoints" / "2")
  shutil.copytree(os.path.join(sp, "checkpoints", "2"), y / "checkpoints" / "2")
  rows_x, out_x = _run(str(x), 3, 1, str(tmp_path / "cache1"))
  rows_y, out_y = _run(str(y), 3, 2, str(tmp_path / "cache2"))
  assert "iteration 2 runs next" in out_x and "iteration 2 runs next" in out_y
  assert [r["iteration"] for r in rows_x] == [2] and [r["iteration"] for r in rows_y] == [2]
  _close(rows_x[0], rows_sp[2])
  _close(rows_y[0], rows_sp[2])


def test_searched_plan_is_process_0s():
  """`plan=search` runs one plan everywhere: process 0's, whatever each process found."""
  res = launch(os.path.join(os.path.dirname(WORKER), "_plan_mp_worker.py"), [], num_processes=2,
               devices_per_process=4, timeout=300)
  plans = {}
  for r in res:
    assert r.returncode == 0 and f"RESULT process={r.process_id} ok" in r.output, r.output[-4000:]
    plans[r.process_id] = next(line.split(" ", 2)[2] for line in r.output.splitlines() if line.startswith("PLAN "))
  assert plans[0] == plans[1], plans
  expected = ExecutionPlan.parse("actor_gen=0:8/d8f1t1, actor_train=0:8/d1f8t1").to_dict()
  assert ast.literal_eval(plans[1]) == expected, plans[1]

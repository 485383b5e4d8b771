"""MetricsWriter (JSON lines == TensorBoard scalars), TimelineWriter, resume truncation, NaN guard."""

import glob
import json
import math
import os

import numpy as np
import pytest

from real_jax.metrics import (MetricsWriter, NonFiniteError, TimelineWriter, check_calls_finite, check_finite,
                              read_jsonl, read_records, read_scalars)


def _row(i):
  return {"iteration": i, "reward": 0.1 * i + 1 / 3, "kl": -1e-3 * i, "actor/loss": 2.5 ** i, "no_eos": i % 2 == 0,
          "note": "text is skipped", "time/call/actor_gen": 0.01 * i}


def _records(i):
  return [{"iteration": i, "name": "actor_gen", "kind": "call", "devices": [0, 8], "start": 1.0 * i,
           "end": 1.0 * i + 0.5, "bytes": 0},
          {"iteration": i, "name": "actor:a->b", "kind": "realloc", "devices": [0, 8], "start": 1.0 * i + 0.5,
           "end": None, "bytes": 1024}]


def _run(workdir, iterations, start=0):
  m, t = MetricsWriter(str(workdir), start_iteration=start), TimelineWriter(str(workdir), start_iteration=start)
  for i in iterations:
    m.write(_row(i))
    t.write(i, _records(i))
  m.close()
  t.close()


def _assert_tb_equals_jsonl(workdir):
  rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  tb = read_scalars(str(workdir))
  assert sorted(tb) == [r["iteration"] for r in rows]
  for r in rows:
    want = {k: np.float32(float(v)) for k, v in r.items() if k not in ("iteration", "note")}
    assert tb[r["iteration"]] == want


def test_jsonl_equals_tensorboard(tmp_path):
  _run(tmp_path, range(4))
  rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert rows == [_row(i) for i in range(4)]
  _assert_tb_equals_jsonl(tmp_path)
  timeline = read_jsonl(str(tmp_path / "timeline.jsonl"))
  assert timeline == [{"iteration": i, "records": _records(i)} for i in range(4)]


def test_event_file_parses_with_tensorboardx_protos(tmp_path):
  """An independent protobuf implementation reads our hand-encoded events."""
  event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
  _run(tmp_path, range(3))
  (path,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  events = [event_pb2.Event.FromString(r) for r in read_records(path)]
  assert events[0].file_version == "brain.Event:2"
  got = {(e.step, v.tag): v.simple_value for e in events[1:] for v in e.summary.value}
  want = {(i, k): float(np.float32(float(v))) for i in range(3) for k, v in _row(i).items()
          if k not in ("iteration", "note")}
  assert got == want


def test_resume_truncates_to_an_uninterrupted_run(tmp_path):
  full, resumed = tmp_path / "full", tmp_path / "resumed"
  _run(full, range(6))
  _run(resumed, range(5))  # Ran past the last checkpoint (step 3), then died...
  with open(resumed / "metrics.jsonl", "a") as f:
    f.write('{"iteration": 5, "rew')  # ...in the middle of a line.
  _run(resumed, range(3, 6), start=3)  # Resumed from step 3: iterations 3, 4, 5 run again.
  for name in ("metrics.jsonl", "timeline.jsonl"):
    assert read_jsonl(str(resumed / name)) == read_jsonl(str(full / name))
  assert read_scalars(str(resumed)) == read_scalars(str(full))
  assert len(glob.glob(str(resumed / "events.out.tfevents.*"))) == 1
  _assert_tb_equals_jsonl(resumed)


def test_fresh_start_clears_old_files(tmp_path):
  _run(tmp_path, range(3))
  _run(tmp_path, range(2))
  assert [r["iteration"] for r in read_jsonl(str(tmp_path / "metrics.jsonl"))] == [0, 1]
  assert sorted(read_scalars(str(tmp_path))) == [0, 1]


def test_non_primary_process_writes_nothing(tmp_path):
  m = MetricsWriter(str(tmp_path), primary=False)
  m.write(_row(0))
  TimelineWriter(str(tmp_path), primary=False).write(0, [])
  m.close()
  assert os.listdir(tmp_path) == []


def test_row_needs_iteration(tmp_path):
  with pytest.raises(ValueError, match="'iteration'"):
    MetricsWriter(str(tmp_path)).write({"reward": 1.0})


def test_check_finite_names_call_iteration_and_metric():
  check_finite({"loss": 1.0, "grad_norm": np.float32(3.0), "note": "x", "flag": True}, call="actor_train",
               iteration=2)
  with pytest.raises(NonFiniteError) as e:
    check_finite({"actor/loss": 0.5, "actor/grad_norm": float("inf")}, call="actor_train", iteration=7)
  msg = str(e.value)
  assert "'actor_train'" in msg and "iteration 7" in msg and "actor/grad_norm=inf" in msg
  assert (e.value.call, e.value.iteration, list(e.value.bad)) == ("actor_train", 7, ["actor/grad_norm"])
  assert isinstance(e.value, FloatingPointError)


def test_check_calls_finite_routes_by_prefix():
  row = {"reward": 1.0, "actor/loss": 0.1, "critic/loss": np.float32("nan")}
  with pytest.raises(NonFiniteError, match=r"call 'critic_train' at iteration 4: critic/loss=nan"):
    check_calls_finite(row, iteration=4, calls={"actor/": "actor_train", "critic/": "critic_train"})
  with pytest.raises(NonFiniteError, match=r"call 'iteration' at iteration 1: kl=-inf"):
    check_calls_finite({"kl": -math.inf}, iteration=1, calls={"actor/": "actor_train"})

"""Worker for the multi-process checkpoint tests (launched by tests/_mp_launch.py).

    _ckpt_mp_worker.py save    WORKDIR ACTOR_LAYOUT REF_LAYOUT
    _ckpt_mp_worker.py restore WORKDIR ACTOR_LAYOUT REF_LAYOUT

Layouts as "START:SIZE/d1f8t1" (positions in the global jax.devices() order). Every process runs
the same calls (orbax synchronises them); each checks its own addressable shards against the
NumPy references of tests/test_checkpoint.py and prints "RESULT process=<i> ok".
"""

import sys

from _mp_launch import exit_on_error, init_worker

pid, nproc = init_worker()

import jax  # noqa: E402

from real_jax.checkpoint import Checkpointer  # noqa: E402
from sharding import DeviceMesh, Layout, Strategy  # noqa: E402
from test_checkpoint import EXTRA, _abstract_like, _assert_restored, _slots  # noqa: E402


def parse_layout(text: str) -> Layout:
  where, strategy = text.split("/")
  start, size = map(int, where.split(":"))
  return Layout(DeviceMesh(start, size), Strategy.parse(strategy))


def main():
  mode, workdir = sys.argv[1], sys.argv[2]
  actor_layout, ref_layout = parse_layout(sys.argv[3]), parse_layout(sys.argv[4])
  assert jax.process_count() == nproc and jax.device_count() == 8, (jax.process_count(), jax.device_count())
  ck = Checkpointer(workdir, every=1, config={"seed": 0})
  if mode == "save":
    slots, _ = _slots(actor_layout)
    if ref_layout != actor_layout:
      ref, _ = _slots(ref_layout)
      slots["ref"] = ref["ref"]
    assert ck.save(1, slots, EXTRA)
  else:
    _, refs = _slots(actor_layout)  # NumPy references (the same seeds as the writer's).
    like = _abstract_like(actor_layout)
    r = ck.restore(None, {"actor": actor_layout, "ref": ref_layout}, like=like)
    assert r.step == 1 and r.extra == EXTRA, (r.step, r.extra)
    _assert_restored(r.train_states["actor"], refs["actor"], actor_layout)
    _assert_restored(r.params["ref"], refs["ref"], ref_layout)
    shards = sum(len(x.addressable_shards) for x in jax.tree.leaves(r.train_states["actor"]))
    print(f"checked {shards} actor shards on process {pid}", flush=True)
  ck.close()
  print(f"RESULT process={pid} ok", flush=True)
  if nproc > 1:
    jax.distributed.shutdown()


exit_on_error(main)

"""Worker for tests/test_runtime_multiprocess.py (launched by tests/_mp_launch.py).

    _runtime_mp_worker.py WORKDIR NUM_ITERATIONS

Every process runs the same `real_jax.runtime.run` on a ppo_tiny-sized experiment, colocated on all
8 devices (the checkpointed home layouts span every process: orbax 0.12 cannot save arrays whose
devices are all on one process). Only process 0 writes metrics; every process takes part in the
checkpoints. Prints "RESULT process=<i> ok".
"""

import sys

from _mp_launch import exit_on_error, init_worker

pid, nproc = init_worker()

import jax  # noqa: E402

from real_jax.experiment import experiment_from_config  # noqa: E402
from real_jax.runtime import run  # noqa: E402
from test_resume import ppo_tiny  # noqa: E402


def config(num_iterations: int):
  c = ppo_tiny.get_config()
  c.num_iterations, c.checkpoint_every, c.sft_warmup_steps = num_iterations, 1, 0
  c.data.batch_size, c.sampling.max_new_tokens = 16, 4
  return experiment_from_config(c)


def main():
  workdir, n = sys.argv[1], int(sys.argv[2])
  assert jax.process_count() == nproc and jax.device_count() == 8, (jax.process_count(), jax.device_count())
  rows = run(config(n), workdir, log=lambda m: print(f"[{pid}] {m}", flush=True), progress=False)
  print(f"process {pid}: ran iterations {[r['iteration'] for r in rows]}", flush=True)
  print(f"RESULT process={pid} ok", flush=True)
  if nproc > 1:
    jax.distributed.shutdown()


exit_on_error(main)

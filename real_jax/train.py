"""Command line: `python -m real_jax.train --config configs/ppo_tiny.py[:arg] --workdir DIR`.

Flags come from `ml_collections.config_flags`: `--config.key=value` overrides any key of the
(locked) config; an unknown key fails at start. Config files are Python and are trusted code.

Multi-host: `--distributed` calls `jax.distributed.initialize()` with auto-detection (SLURM, ...);
`--coordinator_address host:port --num_processes N --process_id I` pass the values explicitly. Every
process runs this same command (SPMD multi-controller); `jax.distributed.initialize` is the only
multi-host setup.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from real_jax.experiment import experiment_from_config
from real_jax.runtime.loop import main_log, run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, timelines and checkpoints.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (cluster auto-detection, e.g. SLURM) first.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (implies --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id (with --coordinator_address).")


def initialize_distributed() -> None:
  """jax.distributed.initialize from the flags; a no-op when none is given."""
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(v is not None for v in explicit):
    missing = [n for n, v in zip(("--coordinator_address", "--num_processes", "--process_id"), explicit) if v is None]
    if missing:
      raise app.UsageError(f"multi-host flags need all three of --coordinator_address, --num_processes, "
                           f"--process_id; missing {missing}")
    import jax
    jax.distributed.initialize(*explicit)
  elif _DISTRIBUTED.value:
    import jax
    jax.distributed.initialize()


def main(argv) -> None:
  del argv
  from real_jax.runtime.engine import dump_stacks_on_signal
  dump_stacks_on_signal()  # kill -USR1 <pid>: every thread's stack, for a run that hangs.
  initialize_distributed()
  exp = experiment_from_config(_CONFIG.value)
  run(exp, _WORKDIR.value, log=main_log, progress=None)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)

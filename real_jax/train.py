"""Command line: `python -m real_jax.train --config configs/ppo_tiny.py[:arg] --workdir DIR`.

Flags come from `ml_collections.config_flags`: `--config.key=value` overrides any key of the
(locked) config; an unknown key fails at start. Config files are Python and are trusted code.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from real_jax.experiment import experiment_from_config
from real_jax.runtime.loop import main_log, run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, timelines and checkpoints.")


def main(argv) -> None:
  del argv
  exp = experiment_from_config(_CONFIG.value)
  run(exp, _WORKDIR.value, log=main_log, progress=None)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)

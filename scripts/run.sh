#!/usr/bin/env bash
# README command (a): set up .venv if needed, then run the embedded default, PPO on a synthetic task with
# tiny models (configs/ppo_tiny.py), on this machine (8 fake CPU devices when no accelerator is present).
# Metrics go to $WORKDIR (default workdir/ppo_tiny); extra arguments are passed on (--config.key=value).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
backend="$(python -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo cpu)"
if [ "$backend" = cpu ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
  export JAX_PLATFORMS=cpu
fi
exec python -m real_jax.train --config configs/ppo_tiny.py --workdir "${WORKDIR:-workdir/ppo_tiny}" "$@"

#!/usr/bin/env bash
# README command (a): set up .venv if needed, then run the embedded default on this machine
# (8 fake CPU devices when no accelerator is present).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
backend="$(python -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo cpu)"
if [ "$backend" = cpu ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
  export JAX_PLATFORMS=cpu
fi
exec python -m real_jax.demo "$@"

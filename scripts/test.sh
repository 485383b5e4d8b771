#!/usr/bin/env bash
# README command (b): set up .venv if needed, then run the whole test suite on 8 fake CPU devices.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
export JAX_PLATFORMS=cpu
exec python -m pytest -n 2 "$@"

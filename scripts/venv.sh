#!/usr/bin/env bash
# Source this file: creates .venv (Python >= 3.12) at the repository root if it is missing,
# installs the project with its test extra, and activates it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
pick_python() {
  for cand in python3 python3.12 python3.13; do
    if command -v "$cand" >/dev/null 2>&1 &&
       "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$cand"; return 0
    fi
  done
  # pyenv machines: .python-version says 3.12; PYENV_VERSION helps outside the repo too.
  if command -v pyenv >/dev/null 2>&1; then
    v="$(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])' | sort -V | tail -n 1 || true)"
    if [ -n "$v" ]; then PYENV_VERSION="$v" pyenv which python3; return 0; fi
  fi
  echo "real_jax needs Python >= 3.12 (jax >= 0.11 requires it); none found on PATH or in pyenv" >&2
  return 1
}
stamp=".venv/.real_jax_installed"
if [ ! -x .venv/bin/python ]; then
  py="$(pick_python)"
  "$py" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
# shellcheck disable=SC1091
source .venv/bin/activate

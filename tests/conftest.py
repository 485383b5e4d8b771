"""Test setup: 8 fake CPU devices, set before JAX starts; one persistent compilation cache per run.

The cache: many tests compile the same tiny programs (the ppo_tiny loop alone is compiled by a dozen
tests in several files). The first pytest process (the xdist controller, or plain pytest) makes a
fresh temporary directory and names it in REAL_JAX_TEST_JAX_CACHE; its xdist workers inherit that and
point this process's JAX at it, so a program compiled once in a run is loaded from disk afterwards.
Only these pytest processes use it: subprocesses a test starts get it only where the test passes it on
explicitly. The directory is removed when that first process exits; set REAL_JAX_TEST_JAX_CACHE
yourself to keep one (never commit it), or to "" for no cache.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "REAL_JAX_TEST_JAX_CACHE" not in os.environ:
  os.environ["REAL_JAX_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="real_jax_test_jax_cache_")
  atexit.register(shutil.rmtree, os.environ["REAL_JAX_TEST_JAX_CACHE"], ignore_errors=True)
CACHE_DIR = os.environ["REAL_JAX_TEST_JAX_CACHE"]

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
if CACHE_DIR:
  jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def cache_env() -> dict:
  """Environment entries that give a single-process subprocess this run's compilation cache."""
  return {"JAX_COMPILATION_CACHE_DIR": CACHE_DIR, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"} if CACHE_DIR \
      else {}


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
  assert jax.device_count() == 8, f"tests need 8 fake CPU devices, got {jax.device_count()}"

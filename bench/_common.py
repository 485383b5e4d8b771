"""Shared bench helpers: hardware ceilings measured in-run, timing, JSON output."""

from __future__ import annotations

import datetime
import json
import os
import time

import jax
import jax.numpy as jnp


def timed(fn, *args, reps: int = 1):
  """Median wall time of fn(*args) over reps runs (results blocked on), after the caller's warm-up."""
  times = []
  out = None
  for _ in range(reps):
    t = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t)
  times.sort()
  return times[len(times) // 2], out


def hbm_bandwidth(device=None, gib: float = 2.0) -> float:
  """Bytes/s of a device-to-device copy on one device, counting bytes read plus bytes written."""
  device = device or jax.devices()[0]
  n = int(gib * 2**30) // 4
  x = jax.device_put(jnp.arange(n, dtype=jnp.float32), device)
  f = jax.jit(lambda a: a * 1.0001 + 1.0)  # one read, one write; not foldable to a no-op
  jax.block_until_ready(f(x))
  t, _ = timed(f, x, reps=10)
  return 2 * n * 4 / t


def matmul_peak(device=None, n: int = 8192) -> float:
  """FLOP/s of a bf16 n x n x n matmul (random data) on one device."""
  device = device or jax.devices()[0]
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.device_put(jax.random.normal(k1, (n, n), jnp.bfloat16), device)
  b = jax.device_put(jax.random.normal(k2, (n, n), jnp.bfloat16), device)
  f = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(f(a, b))
  t, _ = timed(lambda: [f(a, b) for _ in range(10)], reps=5)
  return 2 * n**3 * 10 / t


def card_name() -> str:
  d = jax.devices()[0]
  kind = getattr(d, "device_kind", d.platform).lower()
  for c in ("h100", "h200", "a100", "b200"):
    if c in kind:
      return c
  return d.platform


def header() -> dict:
  return {"card": card_name(), "device_kind": jax.devices()[0].device_kind, "devices": jax.device_count(),
          "jax": jax.__version__, "date": datetime.date.today().isoformat()}


def write(path: str | None, doc: dict) -> None:
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      json.dump(doc, f, indent=1)
  print(json.dumps(doc)[-1500:], flush=True)

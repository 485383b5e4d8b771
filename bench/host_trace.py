"""Where the host spends its time while dispatching a plan's calls: `bench/plans.py` with timers.

    python bench/host_trace.py <bench/plans.py arguments>   e.g. --settings 1.3b:512 --only disaggregated

Wraps the functions that dispatch device work inside the PPO calls (the train calls, each train step,
the mini-batch gather, the advantages program, batch moves, the train-step cache lookup)
and prints, at exit, one `TRACE <what> t=<s> dt=<ms>` line per call over the last iterations: dt is
host time, so a dispatch that waits for the device shows as a long dt. Its output on 4x H200, the
train steps' dispatches each waiting for the step before, is bench/results/host-trace-h200x4.json.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LOG: list[tuple[str, float, float]] = []  # (what, host start, host seconds)
_ORIGINALS: list[tuple[object, str, object]] = []


def _wrap(owner, name: str, label: str) -> None:
  f = getattr(owner, name)

  @functools.wraps(f)
  def timed(*a, **k):
    t = time.perf_counter()
    try:
      return f(*a, **k)
    finally:
      LOG.append((label, t, time.perf_counter() - t))
  _ORIGINALS.append((owner, name, f))
  setattr(owner, name, timed)


def install() -> None:
  """Puts the timers in place (idempotent)."""
  if _ORIGINALS:
    return
  import real_jax.runtime.engine as engine
  import real_jax.runtime.ppo as ppo
  import real_jax.runtime.program as program
  import real_jax.train_step as train_step
  _wrap(program, "train_step", "train_step")
  _wrap(program, "take_rows", "take_rows")
  _wrap(ppo, "_ppo_adv", "ppo_adv")
  _wrap(ppo.PPOProgram, "actor_train", "ACTOR_TRAIN")
  _wrap(ppo.PPOProgram, "critic_train", "CRITIC_TRAIN")
  _wrap(engine.Engine, "move_batch", "move_batch")
  _wrap(train_step, "make_train_step", "make_train_step")


def uninstall() -> None:
  while _ORIGINALS:
    owner, name, f = _ORIGINALS.pop()
    setattr(owner, name, f)


def lines(last: int = 60) -> list[str]:
  t0 = LOG[0][1] if LOG else 0.0
  return [f"TRACE {what:15s} t={t - t0:9.4f} dt={dt * 1e3:9.2f} ms" for what, t, dt in LOG[-last:]]


def main(argv=None) -> int:
  install()
  atexit.register(lambda: print("\n".join(lines()), flush=True))
  import bench.plans as plans
  return plans.main(argv)


if __name__ == "__main__":
  sys.exit(main())

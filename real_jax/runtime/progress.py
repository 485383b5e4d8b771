"""A one-line progress display on stderr: iteration, the headline metrics, time split per call."""

from __future__ import annotations

import sys

HEADLINE = ("reward", "kl", "margin", "accuracy", "nll", "response_len")


def summary(metrics: dict) -> str:
  """`reward 0.512  kl +0.0012  ...  1.23s` from an iteration's metrics (the keys it has)."""
  parts = []
  for k in HEADLINE:
    if k in metrics:
      parts.append(f"{k} {metrics[k]:+.4f}" if k == "kl" else f"{k} {metrics[k]:.3f}")
  parts.append(f"{metrics.get('time/iteration', 0.0):.2f}s")
  return "  ".join(parts)


def time_split(metrics: dict, top: int = 4) -> str:
  """The slowest calls / reallocations of the iteration: `actor_gen 0.41 | actor_train 0.30`."""
  times = sorted(((v, k.split("/", 2)[2]) for k, v in metrics.items() if k.startswith(("time/call/", "time/realloc/"))),
                 reverse=True)
  return " | ".join(f"{name.split(':')[0]} {t:.2f}" for t, name in times[:top])


class Progress:
  """Rewrites one stderr line per iteration (`enabled=None`: only when stderr is a terminal)."""

  def __init__(self, total: int, *, enabled: bool | None = None, stream=None):
    self.stream = stream or sys.stderr
    self.total = total
    self.enabled = self.stream.isatty() if enabled is None else enabled
    self._width = 0

  def update(self, iteration: int, metrics: dict) -> None:
    if not self.enabled:
      return
    n = len(str(self.total))
    done = int(20 * (iteration + 1) / max(self.total, 1))
    line = (f"[{'#' * done}{'.' * (20 - done)}] {iteration + 1:{n}d}/{self.total}  {summary(metrics)}  "
            f"[{time_split(metrics)}]")
    self.stream.write("\r" + line.ljust(self._width))
    self.stream.flush()
    self._width = len(line)

  def close(self) -> None:
    if self.enabled and self._width:
      self.stream.write("\n")
      self.stream.flush()

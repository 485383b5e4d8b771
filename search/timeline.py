"""Timeline picture of a simulated plan: devices down, time across, one bar per call,
reallocations hatched over both meshes (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence

from search.simulate import Event


def draw(events: Sequence[Event], num_devices: int, path: str, *, title: str = "") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = sorted({e.name for e in events if e.kind == "call"})
  cmap = plt.get_cmap("tab10")
  color = {n: cmap(i % 10) for i, n in enumerate(names)}
  fig, ax = plt.subplots(figsize=(12, max(2.5, min(12, 0.12 * num_devices + 2))))
  for e in events:
    if e.kind == "call":
      ax.broken_barh([(e.t0, e.t1 - e.t0)], (e.device_start, e.device_size), facecolors=color[e.name],
                     edgecolors="black", linewidth=0.4)
      if e.iteration == 0:
        ax.text((e.t0 + e.t1) / 2, e.device_start + e.device_size / 2, e.name, ha="center", va="center",
                fontsize=7, clip_on=True)
    else:
      for start, size in ((e.device_start, e.device_size), (e.device_start2, e.device_size2)):
        if size:
          ax.broken_barh([(e.t0, max(e.t1 - e.t0, 1e-9))], (start, size), facecolors="none", edgecolors="red",
                         hatch="////", linewidth=0.6)
  handles = [plt.Rectangle((0, 0), 1, 1, color=color[n]) for n in names]
  handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="none", edgecolor="red", hatch="////"))
  ax.legend(handles, names + ["reallocation / load"], loc="upper right", fontsize=7, ncol=2)
  ax.set_ylim(num_devices, 0)
  ax.set_xlabel("time (s)")
  ax.set_ylabel("device")
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)

"""Execution plans: a Layout for every call of the dataflow graph.

A plan is a value: it round-trips through JSON, prints as a table and parses from a short inline form
(used in configs):

    actor_gen=0:4/d1f1t4, reward_inf=4:2/d2f1t1, ref_inf=6:2/d1f2t1m2, ...

i.e. `call=START:SIZE/STRATEGY[/RULES]`, where STRATEGY is `d<data>f<fsdp>t<tensor>[m<micro_batches>]`.
JSON form:

    {"name": "...", "calls": {"actor_gen": {"devices": [0, 4], "strategy": "d1f1t4", "rules": "auto"}, ...},
     "offload": ["ref"]}

`offload` lists frozen models that rest in host memory between their calls.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping

from sharding import DeviceMesh, Layout, Strategy


def layout_to_text(layout: Layout) -> str:
  dm = layout.device_mesh
  rules = "" if layout.rules == "auto" else f"/{layout.rules}"
  return f"{dm.start}:{dm.size}/{layout.strategy}{rules}"


def layout_from_text(text: str, *, what: str = "layout") -> Layout:
  parts = text.strip().split("/")
  if len(parts) not in (2, 3) or ":" not in parts[0]:
    raise ValueError(f"{what}: cannot parse {text!r}; expected START:SIZE/STRATEGY[/RULES], e.g. 0:4/d1f2t2")
  try:
    start, size = (int(x) for x in parts[0].split(":"))
  except ValueError:
    raise ValueError(f"{what}: device range {parts[0]!r} must be START:SIZE with integers") from None
  try:
    strategy = Strategy.parse(parts[1])
    return Layout(DeviceMesh(start, size), strategy, parts[2] if len(parts) == 3 else "auto")
  except ValueError as e:
    raise ValueError(f"{what}: {e}") from None


@dataclasses.dataclass(frozen=True)
class ExecutionPlan:
  """A Layout per call name, plus which frozen models rest in host memory between calls."""

  layouts: Mapping[str, Layout]
  offload: frozenset[str] = frozenset()
  name: str = ""

  def __post_init__(self):
    object.__setattr__(self, "layouts", dict(self.layouts))
    object.__setattr__(self, "offload", frozenset(self.offload))

  def __getitem__(self, call: str) -> Layout:
    if call not in self.layouts:
      raise KeyError(f"plan {self.name or '(unnamed)'} has no layout for call {call!r}; it covers "
                     f"{sorted(self.layouts)}")
    return self.layouts[call]

  @classmethod
  def colocated(cls, calls: Iterable[str], layout: Layout, *, name: str | None = None) -> ExecutionPlan:
    return cls({c: layout for c in calls}, name=name or f"colocated-{layout.strategy}")

  def check_covers(self, calls: Iterable[str]) -> None:
    calls = list(calls)
    missing = [c for c in calls if c not in self.layouts]
    extra = [c for c in self.layouts if c not in calls]
    if missing:
      raise ValueError(f"plan {self.name or '(unnamed)'} has no layout for calls {missing}")
    if extra:
      raise ValueError(f"plan {self.name or '(unnamed)'} names calls {extra} that the graph does not have "
                       f"(graph calls: {calls})")

  # -- serialisation ---------------------------------------------------------------------------

  def to_dict(self) -> dict:
    return {
        "name": self.name,
        "calls": {c: {"devices": [l.device_mesh.start, l.device_mesh.size], "strategy": str(l.strategy),
                      "rules": l.rules} for c, l in self.layouts.items()},
        "offload": sorted(self.offload),
    }

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)

  @classmethod
  def from_dict(cls, d: Mapping) -> ExecutionPlan:
    if not isinstance(d, Mapping) or "calls" not in d:
      raise ValueError("plan JSON must be an object with a 'calls' mapping")
    layouts = {}
    for call, v in d["calls"].items():
      try:
        start, size = v["devices"]
        layouts[call] = Layout(DeviceMesh(int(start), int(size)), Strategy.parse(v["strategy"]), v.get("rules", "auto"))
      except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"plan entry for call {call!r} is invalid ({e}); expected "
                         f"{{'devices': [start, size], 'strategy': 'd1f2t2', 'rules': 'auto'}}") from None
    unknown = set(d) - {"name", "calls", "offload", "predicted_s", "meta"}
    if unknown:
      raise ValueError(f"plan JSON has unknown keys {sorted(unknown)}")
    return cls(layouts, frozenset(d.get("offload", ())), d.get("name", ""))

  @classmethod
  def from_json(cls, text: str) -> ExecutionPlan:
    return cls.from_dict(json.loads(text))

  @classmethod
  def load(cls, path: str) -> ExecutionPlan:
    with open(path) as f:
      try:
        return cls.from_json(f.read())
      except json.JSONDecodeError as e:
        raise ValueError(f"plan file {path}: not valid JSON ({e})") from None
      except ValueError as e:
        raise ValueError(f"plan file {path}: {e}") from None

  def save(self, path: str) -> None:
    with open(path, "w") as f:
      f.write(self.to_json() + "\n")

  @classmethod
  def parse(cls, text: str, *, name: str = "manual") -> ExecutionPlan:
    """Parses the inline form `call=START:SIZE/STRATEGY[/RULES], ...` (offload: `offload=ref+reward`)."""
    layouts, offload = {}, frozenset()
    for item in filter(None, (s.strip() for s in text.split(","))):
      if "=" not in item:
        raise ValueError(f"plan item {item!r}: expected call=START:SIZE/STRATEGY")
      call, spec = (s.strip() for s in item.split("=", 1))
      if call == "offload":
        offload = frozenset(filter(None, spec.split("+")))
        continue
      layouts[call] = layout_from_text(spec, what=f"plan entry for call {call!r}")
    return cls(layouts, offload, name)

  def to_text(self) -> str:
    items = [f"{c}={layout_to_text(l)}" for c, l in self.layouts.items()]
    if self.offload:
      items.append("offload=" + "+".join(sorted(self.offload)))
    return ", ".join(items)

  # -- display ---------------------------------------------------------------------------------

  def table(self, models: Mapping[str, str] | None = None, times: Mapping[str, float] | None = None) -> str:
    """A text table: call, model, devices, strategy (and a time column when given)."""
    rows = [("call", "model", "devices", "strategy", "rules") + (("time (s)",) if times else ())]
    for c, l in self.layouts.items():
      dm = l.device_mesh
      row = (c, (models or {}).get(c, ""), f"{dm.start}-{dm.stop - 1}", str(l.strategy), l.rules)
      if times:
        row += (f"{times.get(c, float('nan')):.3f}",)
      rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = [f"plan {self.name}" if self.name else "plan"]
    for j, r in enumerate(rows):
      out.append("  ".join(s.ljust(w) for s, w in zip(r, widths)).rstrip())
      if j == 0:
        out.append("  ".join("-" * w for w in widths))
    if self.offload:
      out.append(f"resting in host memory between calls: {', '.join(sorted(self.offload))}")
    return "\n".join(out)

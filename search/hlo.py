"""Collectives of a compiled HLO module, read from its text (`compiled.as_text()`).

XLA's `cost_analysis()` leaves communication out, so the estimator reads every all-gather,
reduce-scatter, all-reduce, all-to-all and collective-permute from the optimised HLO, with its
result shape (bytes) and replica groups (group size), and multiplies the ones inside a `while`
body by the loop's `known_trip_count` (1 when XLA does not know it, e.g. generation's data-dependent
loop: the caller multiplies by the decode steps itself).

Per-device wire bytes of one collective over a group of n devices, for a result of R bytes
(ring algorithms; what NCCL achieves asymptotically):

=================== ==========================
all-gather          R (n-1)/n
reduce-scatter      R (n-1)        (R is the scattered shard)
all-reduce          2 R (n-1)/n
all-to-all          R (n-1)/n
collective-permute  R
=================== ==========================
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}

_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_OP = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)"
                 r"(?:-start)?\(")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
_WHILE = re.compile(r"\swhile\(.*body=%?([\w.\-]+)")
_CALLS = re.compile(r"(?:to_apply|calls|body|condition|true_computation|false_computation|branch_computations)="
                    r"(?:\{([^}]*)\}|%?([\w.\-]+))")
_TRIP = re.compile(r'known_trip_count[^0-9]*"?n"?\s*:\s*"?(\d+)')
_GROUPS_LIST = re.compile(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{([\d,{}]*)\}")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective op: kind, result bytes per device, group size, executions per call."""

  kind: str
  result_bytes: int
  group_size: int
  count: int = 1
  groups: tuple[tuple[int, ...], ...] = ()

  @property
  def wire_bytes(self) -> float:
    """Bytes each device sends (= receives) for one execution (ring algorithm, module docstring)."""
    n, r = self.group_size, self.result_bytes
    if n <= 1 and self.kind != "collective-permute":
      return 0.0
    return {"all-gather": r * (n - 1) / n, "reduce-scatter": r * (n - 1), "all-reduce": 2 * r * (n - 1) / n,
            "all-to-all": r * (n - 1) / n, "collective-permute": float(r)}[self.kind]

  def spans_hosts(self, devices_per_host: int, offset: int = 0) -> bool:
    """Whether some group has members on two hosts (ids are positions inside the call's mesh)."""
    if not self.groups:
      return self.group_size > devices_per_host
    return any(len({(offset + i) // devices_per_host for i in g}) > 1 for g in self.groups)


def _shape_bytes(text: str) -> int:
  total = 0
  for dt, dims in _SHAPE.findall(text):
    if dt not in _DTYPE_BYTES:
      continue
    total += _DTYPE_BYTES[dt] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
  return total


def _groups(line: str, kind: str) -> tuple[tuple[int, ...], ...]:
  m = _GROUPS_MESH.search(line)
  if m:  # replica_groups=mesh['data'=2,'fsdp'=2,'tensor'=2] {'tensor'}: groups over the named axes.
    axes = [(a, int(n)) for a, n in re.findall(r"'([^']+)'=(\d+)", m.group(1))]
    chosen = set(re.findall(r"'([^']+)'", m.group(2)))
    names = [a for a, _ in axes]
    ids = np.arange(int(np.prod([n for _, n in axes]))).reshape([n for _, n in axes])
    keep = [i for i, a in enumerate(names) if a not in chosen]
    sel = [i for i, a in enumerate(names) if a in chosen]
    ids = ids.transpose(keep + sel)
    size = int(np.prod([axes[i][1] for i in sel])) if sel else 1
    return tuple(tuple(int(i) for i in row) for row in ids.reshape(-1, size))
  m = _GROUPS_LIST.search(line)
  if m:
    return tuple(tuple(int(x) for x in g.split(",") if x) for g in re.findall(r"\{([\d,]*)\}", m.group(1)))
  m = _GROUPS_IOTA.search(line)
  if m:  # replica_groups=[G,S]<=[dims]T(perm): G groups of S; member order from the iota (approximate).
    g, s = int(m.group(1)), int(m.group(2))
    iota = re.search(r"<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line[m.end() - 1:])
    ids = np.arange(g * s)
    if iota:
      dims = [int(x) for x in iota.group(1).split(",")]
      ids = ids.reshape(dims)
      if iota.group(2):
        ids = ids.transpose([int(x) for x in iota.group(2).split(",")])
    return tuple(tuple(int(i) for i in row) for row in np.asarray(ids).reshape(g, s))
  if kind == "collective-permute":
    m = _PAIRS.search(line)
    if m:
      return tuple(tuple(int(x) for x in p.split(",")) for p in re.findall(r"\{(\d+,\d+)\}", m.group(1)))
  return ()


def collectives(hlo_text: str, num_devices: int | None = None) -> list[Collective]:
  """Every collective of the module with its execution count (while bodies x known trip counts).

  `num_devices`: the group size for collectives with empty replica groups (= all devices).
  """
  comps: dict[str, list[str]] = {}
  entry, cur = None, None
  for line in hlo_text.splitlines():
    m = _COMP.match(line.strip()) if not line.startswith(" ") else None
    if m and "=" not in line.split("{")[0].split("(")[0]:
      cur = m.group(1)
      comps[cur] = []
      if line.startswith("ENTRY"):
        entry = cur
      continue
    if cur is not None:
      comps[cur].append(line)
  if entry is None:
    entry = next(iter(comps), None)
  # Multiplicity of each computation: product of trip counts of the while loops that reach it.
  mult: dict[str, int] = {}

  def visit(name: str, m: int, depth: int = 0) -> None:
    if name not in comps or depth > 64:
      return
    mult[name] = mult.get(name, 0) + m
    for line in comps[name]:
      w = _WHILE.search(line)
      trip = 1
      if w:
        t = _TRIP.search(line)
        trip = int(t.group(1)) if t else 1
      for cm in _CALLS.finditer(line):
        for callee in (c.strip().lstrip("%") for c in (cm.group(1) or cm.group(2)).split(",")):
          is_body = w is not None and callee == w.group(1)
          visit(callee, m * (trip if is_body else 1), depth + 1)

  if entry is not None:
    visit(entry, 1)
  out = []
  for name, lines in comps.items():
    m = mult.get(name, 0)
    if m == 0:
      continue
    for line in lines:
      op = _OP.search(line)
      if not op or f"{op.group(2)}-done" in line:
        continue
      kind = op.group(2)
      shape_text = op.group(1)
      if line.find("-start(") > 0 and shape_text.startswith("("):  # async start: (operand, result) tuple.
        parts = re.findall(r"\w+\[[\d,]*\]", shape_text)
        shape_text = parts[len(parts) // 2] if parts else shape_text
      groups = _groups(line, kind)
      if kind == "collective-permute":
        size = 2
      else:
        size = len(groups[0]) if groups and groups[0] else (num_devices or 1)
      out.append(Collective(kind, _shape_bytes(shape_text), size, m, groups))
  return out


def comm_counts(colls: list[Collective], devices_per_host: int, offset: int = 0) -> tuple[float, float]:
  """(intra-host, inter-host) executions of collectives that move data (group of 2 or more, or a
  collective-permute), over all executions: what a per-collective latency is charged on."""
  intra = inter = 0.0
  for c in colls:
    if c.group_size <= 1 and c.kind != "collective-permute":
      continue
    if c.spans_hosts(devices_per_host, offset):
      inter += c.count
    else:
      intra += c.count
  return intra, inter


def comm_bytes(colls: list[Collective], devices_per_host: int, offset: int = 0) -> tuple[float, float]:
  """(intra-host, inter-host) wire bytes per device over all executions of all collectives."""
  intra = inter = 0.0
  for c in colls:
    b = c.wire_bytes * c.count
    if c.spans_hosts(devices_per_host, offset):
      inter += b
    else:
      intra += b
  return intra, inter

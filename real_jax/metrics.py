"""Run outputs: metrics (JSON lines + TensorBoard), the per-iteration timeline, and the NaN guard.

    metrics = MetricsWriter(workdir, start_iteration=start)     # start > 0: resuming
    timeline = TimelineWriter(workdir, start_iteration=start)
    ...
    check_finite(row, call="actor_train", iteration=it)          # raises NonFiniteError
    metrics.write(row); timeline.write(it, engine.iteration_records(it))

Files in `workdir`:
* `metrics.jsonl`: one JSON object per iteration, with an "iteration" key;
* `events.out.tfevents.*`: the same rows' numeric values as TensorBoard scalars (step = iteration,
  tag = key; TensorBoard stores `simple_value` as float32, so a scalar equals its JSON value
  rounded to float32). Written by a small built-in TFRecord/protobuf encoder, so TensorBoard
  itself is not a dependency; `read_scalars` reads any event file back;
* `timeline.jsonl`: one {"iteration": i, "records": [...]} per iteration (the engine's Records:
  name, kind "call"/"realloc"/"data", devices (start, size), start, end, bytes).

Resuming at iteration s (the checkpoint's step) drops every row with iteration >= s from all three,
so after the resumed run finishes the files hold what an uninterrupted run would have written
(timings aside). A torn last line from a killed process is dropped too.
Only process 0 writes (`primary`), so every process may construct these objects.
"""

from __future__ import annotations

import glob
import json
import math
import numbers
import os
import socket
import struct
import time
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

METRICS_FILE, TIMELINE_FILE = "metrics.jsonl", "timeline.jsonl"
EVENTS_GLOB = "events.out.tfevents.*"


# -- NaN / Inf guard ---------------------------------------------------------------------------


class NonFiniteError(FloatingPointError):
  """A loss, gradient norm or other metric became NaN/Inf; names the call, iteration and metric."""

  def __init__(self, call: str, iteration: int, bad: dict[str, float]):
    self.call, self.iteration, self.bad = call, iteration, dict(bad)
    shown = ", ".join(f"{k}={v}" for k, v in list(bad.items())[:8])
    super().__init__(f"non-finite metric in call {call!r} at iteration {iteration}: {shown}; the run stops "
                     f"here, and the last checkpoint saved before this iteration is intact")


def _as_float(v: Any) -> float | None:
  if isinstance(v, bool):
    return float(v)
  if isinstance(v, numbers.Number):
    return float(v)
  if isinstance(v, np.ndarray | np.generic) and np.size(v) == 1 and np.issubdtype(np.asarray(v).dtype, np.number):
    return float(np.asarray(v).reshape(()))
  return None


def check_finite(metrics: Mapping[str, Any], *, call: str, iteration: int, prefix: str = "") -> None:
  """Raises NonFiniteError if any numeric metric (whose key starts with `prefix`) is NaN or Inf.

  Takes values the loop has already read to the host (floats, NumPy scalars): it adds no device
  sync of its own. Call it before the iteration's checkpoint is saved, so a bad state is never
  saved. Non-numeric values are ignored.
  """
  bad = {}
  for k, v in metrics.items():
    if not k.startswith(prefix):
      continue
    f = _as_float(v)
    if f is not None and not math.isfinite(f):
      bad[k] = f
  if bad:
    raise NonFiniteError(call, iteration, bad)


def check_calls_finite(metrics: Mapping[str, Any], *, iteration: int, calls: Mapping[str, str]) -> None:
  """`check_finite` per call: `calls` maps a metric-key prefix (e.g. "actor/") to its call's name
  (e.g. "actor_train"); keys matching no prefix are checked under the call name "iteration"."""
  for prefix, call in calls.items():
    check_finite(metrics, call=call, iteration=iteration, prefix=prefix)
  rest = {k: v for k, v in metrics.items() if not any(k.startswith(p) for p in calls)}
  check_finite(rest, call="iteration", iteration=iteration)


# -- JSON lines --------------------------------------------------------------------------------


def _primary(primary: bool | None) -> bool:
  return jax.process_index() == 0 if primary is None else bool(primary)


def read_jsonl(path: str) -> list[dict]:
  """Rows of a JSON-lines file; a torn (unparseable) last line is skipped."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        break  # A line cut by a killed process: nothing after it is trusted.
  return rows


def truncate_jsonl(path: str, start_iteration: int) -> list[dict]:
  """Rewrites `path` keeping rows with iteration < start_iteration (all gone for 0); returns them."""
  keep = [r for r in read_jsonl(path) if int(r.get("iteration", -1)) < start_iteration] if start_iteration else []
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in keep)
  os.replace(tmp, path)  # Atomic: a kill here leaves the old or the new file, never half of one.
  return keep


class _JsonlWriter:
  def __init__(self, path: str, start_iteration: int, primary: bool | None):
    self.path, self.primary = path, _primary(primary)
    if self.primary:
      os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
      truncate_jsonl(path, start_iteration)
      self._f = open(path, "a")

  def _write(self, row: dict) -> None:
    if self.primary:
      self._f.write(json.dumps(row) + "\n")
      self._f.flush()

  def close(self) -> None:
    if self.primary and not self._f.closed:
      self._f.close()


class TimelineWriter(_JsonlWriter):
  """`timeline.jsonl`: {"iteration": i, "records": [Record.to_dict(), ...]} per iteration."""

  def __init__(self, workdir: str, *, start_iteration: int = 0, primary: bool | None = None):
    super().__init__(os.path.join(workdir, TIMELINE_FILE), start_iteration, primary)

  def write(self, iteration: int, records: Iterable[dict]) -> None:
    self._write({"iteration": int(iteration), "records": list(records)})


class MetricsWriter(_JsonlWriter):
  """`metrics.jsonl` rows and the same numeric values as TensorBoard scalars."""

  def __init__(self, workdir: str, *, start_iteration: int = 0, tensorboard: bool = True,
               primary: bool | None = None):
    super().__init__(os.path.join(workdir, METRICS_FILE), start_iteration, primary)
    self.workdir, self._events = workdir, None
    if self.primary and tensorboard:
      self._events = _rewrite_events(workdir, start_iteration)

  def write(self, row: Mapping[str, Any]) -> None:
    """Appends one row (must hold "iteration"); numeric values also go to TensorBoard."""
    if "iteration" not in row:
      raise ValueError(f"MetricsWriter.write: a row needs an 'iteration' key, got keys {sorted(row)[:8]}")
    row = dict(row)
    self._write(row)
    if self._events is not None:
      step = int(row["iteration"])
      scalars = {k: f for k, v in row.items() if k != "iteration" and (f := _as_float(v)) is not None}
      self._events.write(_scalars_event(step, scalars, time.time()))
      self._events.flush()

  def close(self) -> None:
    super().close()
    if self._events is not None and not self._events.closed:
      self._events.close()


# -- TensorBoard event files (TFRecord of Event protos), dependency-free -----------------------


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def _crc32c(data: bytes) -> int:
  c = 0xFFFFFFFF
  for b in data:
    c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  c = _crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
  return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None, summary: bytes | None = None) -> bytes:
  """An `Event` proto: wall_time (1, double), step (2, int64), file_version (3), summary (5)."""
  out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
  if file_version is not None:
    out += _len_field(3, file_version.encode())
  if summary is not None:
    out += _len_field(5, summary)
  return out


def _scalars_event(step: int, scalars: Mapping[str, float], wall_time: float) -> bytes:
  """Summary{value: [Value{tag (1), simple_value (2, float)}...]} in one Event."""
  summary = b"".join(_len_field(1, _len_field(1, tag.encode()) + b"\x15" + struct.pack("<f", v))
                     for tag, v in scalars.items())
  return _event(wall_time, step, summary=summary)


def _record(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


class _EventFile:
  def __init__(self, path: str):
    self.path = path
    self._f = open(path, "ab")

  @property
  def closed(self) -> bool:
    return self._f.closed

  def write(self, event: bytes) -> None:
    self._f.write(_record(event))

  def flush(self) -> None:
    self._f.flush()

  def close(self) -> None:
    self._f.close()


def _rewrite_events(workdir: str, start_iteration: int) -> _EventFile:
  """A new event file holding the scalars of existing files with step < start_iteration; the old
  files are deleted (TensorBoard's view then equals an uninterrupted run's)."""
  old = sorted(glob.glob(os.path.join(workdir, EVENTS_GLOB)))
  kept = [] if not start_iteration else [e for e in _iter_scalar_events(old) if e[1] < start_iteration]
  name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
  tmp = os.path.join(workdir, "." + name)
  with open(tmp, "wb") as f:
    f.write(_record(_event(time.time(), 0, file_version="brain.Event:2")))
    for wall, step, scalars in kept:
      f.write(_record(_scalars_event(step, scalars, wall)))
  path = os.path.join(workdir, name)
  os.replace(tmp, path)
  for p in old:
    if p != path:  # The same name when a writer reopens within one second.
      os.remove(p)
  return _EventFile(path)


# -- reading event files back (for tests, the search's plots, and resume) ----------------------


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
  shift = n = 0
  while True:
    b = buf[i]
    i += 1
    n |= (b & 0x7F) << shift
    shift += 7
    if not b & 0x80:
      return n, i


def _fields(buf: bytes):
  """(field number, wire type, value) of a protobuf message (varint, fixed64, len, fixed32)."""
  i = 0
  while i < len(buf):
    key, i = _read_varint(buf, i)
    field, wire = key >> 3, key & 7
    if wire == 0:
      v, i = _read_varint(buf, i)
    elif wire == 1:
      v, i = buf[i:i + 8], i + 8
    elif wire == 2:
      n, i = _read_varint(buf, i)
      v, i = buf[i:i + n], i + n
    elif wire == 5:
      v, i = buf[i:i + 4], i + 4
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")
    yield field, wire, v


def read_records(path: str) -> list[bytes]:
  """The records of a TFRecord file, checking CRCs; stops at a truncated tail (a killed writer)."""
  with open(path, "rb") as f:
    data = f.read()
  out, i = [], 0
  while i + 12 <= len(data):
    header = data[i:i + 8]
    (n,) = struct.unpack("<Q", header)
    if struct.unpack("<I", data[i + 8:i + 12])[0] != _masked_crc(header) or i + 16 + n > len(data):
      break
    payload = data[i + 12:i + 12 + n]
    if struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] != _masked_crc(payload):
      break
    out.append(payload)
    i += 16 + n
  return out


def _iter_scalar_events(paths: Iterable[str]):
  for path in paths:
    for rec in read_records(path):
      wall, step, scalars = 0.0, 0, {}
      for field, _, v in _fields(rec):
        if field == 1:
          wall = struct.unpack("<d", v)[0]
        elif field == 2:
          step = v
        elif field == 5:
          for f2, _, value in _fields(v):
            if f2 != 1:
              continue
            tag, x = None, None
            for f3, _, w in _fields(value):
              if f3 == 1:
                tag = w.decode()
              elif f3 == 2:
                x = struct.unpack("<f", w)[0]
            if tag is not None and x is not None:
              scalars[tag] = x
      if scalars:
        yield wall, step, scalars


def read_scalars(logdir: str) -> dict[int, dict[str, float]]:
  """step -> {tag: value} over every event file in `logdir` (later files win on a repeated step)."""
  out: dict[int, dict[str, float]] = {}
  for _, step, scalars in _iter_scalar_events(sorted(glob.glob(os.path.join(logdir, EVENTS_GLOB)))):
    out.setdefault(step, {}).update(scalars)
  return out

"""Device meshes, strategies and layouts.

This module is the only place in the project that builds `jax.sharding.Mesh` objects.

Vocabulary (see DESIGN.md section 2):

* `DeviceMesh` - a contiguous range of *global* device ids (`jax.devices()` order). Sizes are
  powers of two inside a host and whole hosts beyond; `DeviceMesh.validate` checks this.
* `Strategy` - sizes of the mesh axes `data`, `fsdp`, `tensor` and the micro-batch count.
  The product of the three axis sizes must equal the DeviceMesh size.
* `Layout` - a DeviceMesh plus a Strategy plus the name of a logical-axis rule set
  (`sharding.rules`). A Layout determines the `NamedSharding` of every parameter, optimizer
  slot and activation of one call.

Design note: DESIGN.md gives the DeviceMesh "a shape and axis names". Here the shape lives in
the Strategy only (one call's mesh shape *is* its strategy), so the two cannot disagree; the
DeviceMesh is just which devices. `Layout.mesh` combines them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import numpy as np

AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")


def _is_pow2(n: int) -> bool:
  return n > 0 and (n & (n - 1)) == 0


@dataclasses.dataclass(frozen=True)
class DeviceMesh:
  """A contiguous range `[start, start + size)` of positions in the global `jax.devices()` order."""

  start: int
  size: int

  def __post_init__(self):
    if self.start < 0 or self.size < 1:
      raise ValueError(f"DeviceMesh needs start >= 0 and size >= 1, got start={self.start} size={self.size}")

  @classmethod
  def all(cls) -> DeviceMesh:
    return cls(0, jax.device_count())

  @property
  def device_ids(self) -> tuple[int, ...]:
    return tuple(range(self.start, self.start + self.size))

  @property
  def stop(self) -> int:
    return self.start + self.size

  def devices(self) -> list[jax.Device]:
    """The devices at positions [start, stop) of `jax.devices()` (global order across processes).

    Positions, not `Device.id`s: ids need not be contiguous (multi-process CPU numbers the second
    process's devices from 2048), but the global order is the same on every process.
    """
    all_devices = jax.devices()
    if self.stop > len(all_devices):
      raise ValueError(
          f"{self} needs devices at positions {self.start}..{self.stop - 1}, but only {len(all_devices)} "
          f"devices exist")
    return list(all_devices[self.start:self.stop])

  def overlaps(self, other: DeviceMesh) -> bool:
    return self.start < other.stop and other.start < self.stop

  def validate(self, *, devices_per_host: int | None = None, num_devices: int | None = None) -> None:
    """Checks the placement rules: power-of-two and aligned inside a host, whole hosts beyond."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    per_host = jax.local_device_count() if devices_per_host is None else devices_per_host
    if self.stop > num_devices:
      raise ValueError(f"{self} needs devices up to id {self.stop - 1}, but there are {num_devices}")
    if self.size <= per_host:
      if not _is_pow2(self.size) or self.start % self.size:
        raise ValueError(f"{self}: inside one host a mesh must have a power-of-two size and start at a "
                         f"multiple of it")
    elif self.size % per_host or self.start % per_host:
      raise ValueError(f"{self}: beyond one host ({per_host} devices) a mesh must span whole hosts")

  def __str__(self) -> str:
    return f"DeviceMesh[{self.start}:{self.stop}]"


@dataclasses.dataclass(frozen=True)
class Strategy:
  """Mesh axis sizes (data x fsdp x tensor) and the number of micro-batches of one call."""

  data: int = 1
  fsdp: int = 1
  tensor: int = 1
  micro_batches: int = 1

  def __post_init__(self):
    for name in (*AXES, "micro_batches"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"Strategy.{name} must be a positive int, got {v!r}")

  @property
  def size(self) -> int:
    return self.data * self.fsdp * self.tensor

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.data, self.fsdp, self.tensor)

  def __str__(self) -> str:
    s = f"d{self.data}f{self.fsdp}t{self.tensor}"
    return s + (f"m{self.micro_batches}" if self.micro_batches > 1 else "")

  @classmethod
  def parse(cls, text: str) -> Strategy:
    """Parses the short form `d2f2t1` (optionally `m4`), as printed by `str(strategy)`."""
    import re
    m = re.fullmatch(r"d(\d+)f(\d+)t(\d+)(?:m(\d+))?", text.strip())
    if not m:
      raise ValueError(f"cannot parse strategy {text!r}: expected e.g. 'd2f2t1' or 'd1f4t2m2'")
    d, f, t, mb = m.groups()
    return cls(int(d), int(f), int(t), int(mb or 1))


@functools.lru_cache(maxsize=None)
def _build_mesh(device_ids: tuple[int, ...], shape: tuple[int, int, int]) -> jax.sharding.Mesh:
  by_id = {d.id: d for d in jax.devices()}
  devs = np.array([by_id[i] for i in device_ids], dtype=object).reshape(shape)
  return jax.sharding.Mesh(devs, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def make_mesh(device_mesh: DeviceMesh, strategy: Strategy) -> jax.sharding.Mesh:
  """The `jax.sharding.Mesh` with axes (data, fsdp, tensor) over `device_mesh`'s devices.

  Axis types are `Auto` (spelled out, since `jax.make_mesh` now defaults to Explicit): every
  jitted call in this project states its input and output shardings, and XLA's propagation
  handles the inside.
  """
  if strategy.size != device_mesh.size:
    raise ValueError(f"strategy {strategy} has {strategy.size} devices but {device_mesh} has "
                     f"{device_mesh.size}")
  return _build_mesh(tuple(d.id for d in device_mesh.devices()), strategy.shape)


@dataclasses.dataclass(frozen=True)
class Layout:
  """DeviceMesh + Strategy + logical-axis rule set name: everything that places one call."""

  device_mesh: DeviceMesh
  strategy: Strategy
  rules: str = "auto"

  def __post_init__(self):
    if self.strategy.size != self.device_mesh.size:
      raise ValueError(f"Layout: strategy {self.strategy} uses {self.strategy.size} devices but "
                       f"{self.device_mesh} has {self.device_mesh.size}")

  @property
  def mesh(self) -> jax.sharding.Mesh:
    return make_mesh(self.device_mesh, self.strategy)

  def replicated(self) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  def named(self, *spec) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec))

  @classmethod
  def on(cls, start: int = 0, *, data: int = 1, fsdp: int = 1, tensor: int = 1, micro_batches: int = 1,
         rules: str = "auto") -> Layout:
    """Shorthand: `Layout.on(4, fsdp=2, tensor=2)` is devices 4..7 as a 1x2x2 mesh."""
    st = Strategy(data, fsdp, tensor, micro_batches)
    return cls(DeviceMesh(start, st.size), st, rules)

  def __str__(self) -> str:
    return f"{self.device_mesh}/{self.strategy}" + ("" if self.rules == "auto" else f"/{self.rules}")


def submeshes(num_devices: int, devices_per_host: int) -> list[DeviceMesh]:
  """Every valid DeviceMesh on a cluster: aligned powers of two inside a host, whole hosts beyond."""
  out = []
  size = 1
  while size <= devices_per_host:
    out += [DeviceMesh(s, size) for s in range(0, num_devices, size)]
    size *= 2
  hosts = num_devices // devices_per_host
  for n in range(2, hosts + 1):
    out += [DeviceMesh(h * devices_per_host, n * devices_per_host) for h in range(0, hosts - n + 1)]
  return out


def strategies(size: int, *, micro_batches: Sequence[int] = (1,)) -> list[Strategy]:
  """All (data, fsdp, tensor) factorisations of `size` into powers of two, times micro-batch counts."""
  out = []
  for t in (2**i for i in range(int(math.log2(size)) + 1) if size % 2**i == 0):
    for f in (2**i for i in range(int(math.log2(size // t)) + 1)):
      if size % (t * f) == 0:
        d = size // (t * f)
        out += [Strategy(d, f, t, m) for m in micro_batches]
  return out


def mesh_over_devices(devices: Sequence[jax.Device], shape: tuple[int, int, int]) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) `Mesh` of `shape` over exactly these devices, in this order (any devices,
  not only a contiguous DeviceMesh; e.g. the second process's devices on multi-process CPU)."""
  return _build_mesh(tuple(d.id for d in devices), tuple(shape))

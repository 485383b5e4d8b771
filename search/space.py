"""The search space: candidate layouts per call, and reallocation pricing.

Candidates of a call: every valid DeviceMesh of the cluster (`sharding.submeshes`: aligned powers of
two inside a host, whole hosts beyond) times every (data, fsdp, tensor) factorisation
(`sharding.strategies`) that the model's shapes and the call's batch admit, times micro-batch
counts (1 for generation):

* tensor stays inside a host and divides heads, d_ff and (lm head) the vocabulary;
* fsdp divides d_model (the `embed` axis it shards);
* data x fsdp x micro_batches divides the call's batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from search.estimator import CallSpec
from search.profile import Profile
from sharding import DeviceMesh, Layout, Strategy, check_rules, strategies, submeshes


def valid_strategy(spec: CallSpec, st: Strategy, devices_per_host: int) -> bool:
  m = spec.shape
  t, f = st.tensor, st.fsdp
  if t > devices_per_host or m.n_heads % t or m.d_ff % t or (spec.head == "lm" and m.vocab_size % t):
    return False
  if m.d_model % f:
    return False
  if spec.kind == "generate" and st.micro_batches != 1:
    return False
  return spec.batch % (st.data * f * st.micro_batches) == 0


def candidates(spec: CallSpec, num_devices: int, devices_per_host: int,
               micro_batches: Sequence[int] = (1, 2, 4, 8)) -> list[Layout]:
  out = []
  by_size: dict[int, list[Strategy]] = {}
  for dm in submeshes(num_devices, devices_per_host):
    if dm.size not in by_size:
      by_size[dm.size] = [s for s in strategies(dm.size, micro_batches=tuple(micro_batches))
                          if valid_strategy(spec, s, devices_per_host)]
    out += [Layout(dm, s) for s in by_size[dm.size]]
  return out


@functools.lru_cache(maxsize=None)
def placement(layout: Layout) -> Layout:
  """Where the layout puts parameters: the layout without micro-batches, under the canonical rule set.

  Two layouts with equal placements give every parameter leaf the same devices and shards, so moving a
  model between them moves nothing. Micro-batches only split the batch; every valid rule set
  (`sharding.check_rules`) shards exactly the axes its strategy gives size > 1, like "auto" (e.g.
  "fsdp" with tensor=1), so those become "auto". An invalid rule set is kept as is.
  """
  st = layout.strategy
  rules = layout.rules
  try:
    check_rules(layout)
    rules = "auto"
  except ValueError:
    pass
  if st.micro_batches == 1 and rules == layout.rules:
    return layout
  return Layout(layout.device_mesh, Strategy(st.data, st.fsdp, st.tensor, 1), rules)


def _blocks(layout: Layout) -> dict[int, tuple[float, float, float, float]]:
  """Device -> the (embed, tensor-parallel) block of a [embed, heads/mlp/vocab] matrix it holds, as
  fractions (e0, e1, t0, t1). Mesh devices are in (data, fsdp, tensor) row-major order."""
  dm, st = layout.device_mesh, layout.strategy
  out = {}
  for local in range(dm.size):
    t, f = local % st.tensor, (local // st.tensor) % st.fsdp
    out[dm.start + local] = (f / st.fsdp, (f + 1) / st.fsdp, t / st.tensor, (t + 1) / st.tensor)
  return out


def received_fractions(src: Layout, dst: Layout) -> dict[int, float]:
  """Per destination device, the fraction of a parameter matrix it must receive: its block minus what
  it already holds in `src` (0 where the source block covers it, e.g. a replicated source)."""
  have = _blocks(src)
  out = {}
  for dev, (e0, e1, t0, t1) in _blocks(dst).items():
    need = (e1 - e0) * (t1 - t0)
    if dev in have:
      s0, s1, u0, u1 = have[dev]
      need -= max(0.0, min(e1, s1) - max(e0, s0)) * max(0.0, min(t1, u1) - max(t0, u0))
    out[dev] = max(need, 0.0)
  return out


class ReallocPricer:
  """Seconds to move a model's parameters from one layout to another, cached per pair.

  `trees[model] = (shapes_tree, shardings_fn)` (from real_jax): where both layouts fit the local
  devices the price is `sharding.realloc_cost` on the real parameter tree. Elsewhere (e.g. 128 GPUs
  planned on 8 CPU devices) the analytic model below, which `bench/search_scale.py` compares with
  `realloc_cost` where both apply:

  each destination device receives the part of its shard (P / (fsdp x tensor) parameter bytes) that
  it does not already hold in the source layout (`received_fractions`, parameters taken as
  [embed, tensor-parallel] matrices); same devices: an in-mesh reshard at the collective bandwidth;
  other devices: the copy time of the busiest receiver or sender at the device-to-device bandwidth
  (inter-host bandwidth when the two meshes sit on different hosts), plus a transfer latency per
  parameter leaf. Zero bytes to move costs only the per-leaf latency.

  Layouts with the same `placement` (e.g. differing only in micro-batches) cost nothing on either path.
  """

  def __init__(self, specs: Mapping[str, CallSpec], profile: Profile,
               trees: Mapping[str, tuple[Any, Callable[[Layout], Any]]] | None = None):
    self.profile = profile
    self.trees = dict(trees or {})
    self.shape = {}
    for s in specs.values():
      self.shape.setdefault(s.model, s.shape)
    self._cache: dict[tuple, float] = {}

  def analytic(self, model: str, src: Layout, dst: Layout) -> float:
    if placement(src) == placement(dst):
      return 0.0
    m, hw = self.shape[model], self.profile
    total = m.params * m.param_bytes
    frac = received_fractions(src, dst)
    recv = max(frac.values()) * total
    lat = m.n_leaves() * hw.transfer_latency_s
    if recv == 0.0:
      return lat
    s, d = src.device_mesh, dst.device_mesh
    if s == d:
      return recv / hw.intra_mesh_collective_bandwidth + lat
    send = sum(frac.values()) * total / s.size
    per = hw.devices_per_host
    cross = ({i // per for i in range(s.start, s.stop)} != {i // per for i in range(d.start, d.stop)}
             and max(s.size, d.size) >= per) or (s.start // per != d.start // per)
    bw = hw.inter_host_bandwidth if cross else hw.d2d_bandwidth
    return max(recv, send) / bw + lat

  def __call__(self, model: str, src: Layout, dst: Layout) -> float:
    key = (model, placement(src), placement(dst))
    if key not in self._cache:
      self._cache[key] = self._price(model, *key[1:])
    return self._cache[key]

  def _price(self, model: str, src: Layout, dst: Layout) -> float:
    if src == dst:
      return 0.0
    if model in self.trees:
      import jax
      if max(src.device_mesh.stop, dst.device_mesh.stop) <= jax.device_count():
        from sharding import realloc_cost
        shapes, shardings = self.trees[model]
        return realloc_cost(shardings(src), shardings(dst), shapes, self.profile.hardware)
    return self.analytic(model, src, dst)


def n_plans(sizes: Sequence[int]) -> float:
  return math.prod(sizes)


__all__ = ["DeviceMesh", "ReallocPricer", "candidates", "n_plans", "placement", "received_fractions",
           "valid_strategy"]

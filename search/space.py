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

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from search.estimator import CallSpec
from search.profile import Profile
from sharding import DeviceMesh, Layout, Strategy, strategies, submeshes


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


class ReallocPricer:
  """Seconds to move a model's parameters from one layout to another, cached per pair.

  `trees[model] = (shapes_tree, shardings_fn)` (from real_jax): where both layouts fit the local
  devices the price is `sharding.realloc_cost` on the real parameter tree. Elsewhere (e.g. 128 GPUs
  planned on 8 CPU devices) the analytic model below, which `bench/search_scale.py` compares with
  `realloc_cost` where both apply:

  each destination device receives its shard, P / (fsdp x tensor) parameter bytes (nothing when the
  layouts are equal); same devices: an in-mesh reshard at the collective bandwidth; other devices: the
  copy time of the busiest receiver or sender at the device-to-device bandwidth (inter-host bandwidth
  when the two meshes sit on different hosts), plus a transfer latency per parameter leaf.
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
    if src == dst:
      return 0.0
    m, hw = self.shape[model], self.profile
    total = m.params * m.param_bytes
    recv = total / (dst.strategy.fsdp * dst.strategy.tensor)
    lat = m.n_leaves() * hw.transfer_latency_s
    s, d = src.device_mesh, dst.device_mesh
    if s == d:
      return recv / hw.intra_mesh_collective_bandwidth + lat
    send = recv * d.size / s.size
    per = hw.devices_per_host
    cross = ({i // per for i in range(s.start, s.stop)} != {i // per for i in range(d.start, d.stop)}
             and max(s.size, d.size) >= per) or (s.start // per != d.start // per)
    bw = hw.inter_host_bandwidth if cross else hw.d2d_bandwidth
    return max(recv, send) / bw + lat

  def __call__(self, model: str, src: Layout, dst: Layout) -> float:
    key = (model, src, dst)
    if key not in self._cache:
      self._cache[key] = self._price(model, src, dst)
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


__all__ = ["DeviceMesh", "ReallocPricer", "candidates", "n_plans", "valid_strategy"]

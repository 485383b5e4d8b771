"""Benchmark of `sharding.reallocate` against naive `jax.device_put` and the raw copy bound.

  PYTHONPATH=$PWD python bench/realloc.py --out bench/results/realloc-h100.json      # 4 GPUs
  PYTHONPATH=$PWD python bench/realloc.py --devices 2 --variants old,packed,gather \\
      --out $OUT/realloc-h100x2.json                                                  # 2 GPUs (.gpu/realloc.sh)
  PYTHONPATH=$PWD python bench/realloc.py --small --out /tmp/realloc-cpu.json        # 8 fake CPUs (smoke test)
  PYTHONPATH=$PWD python bench/realloc.py --fit bench/results/realloc-h100x2.json bench/results/realloc-h100.json
  PYTHONPATH=$PWD python bench/realloc.py --table bench/results/realloc-h100.json    # README table

For each model (LLaMA-7B- and 1B-shaped bf16 parameter trees: `--tree stacked`, real_jax's own layer-stacked
Transformer, 12 / 11 leaves, the default; `--tree per_layer`, 291 / 201 leaves; --small: tiny trees on 8 fake
CPU devices) and each transition it measures:

* reallocate_s - `reallocate(tree, targets)` with its defaults (schedule "auto": `schedule_chosen` says which)
                 until every output is ready: median of --reps after one warm-up (the warm-up compiles and
                 caches the plan); reallocate_dispatch_s is the time until the call returns (host work plus
                 waits for earlier buckets), same reps; reallocate_serial_s and reallocate_pipelined_s: the
                 two schedules forced; reallocate_unbucketed_s with bucket_bytes=None (after one compiling
                 call) and reallocate_unbucketed_dispatch_s its time until return: with nothing waited for,
                 that is the host time of the call (GPUs run programs asynchronously; the CPU backend runs
                 small programs inline, so on CPU it includes them);
* reallocate_variants_s - {variant: seconds} for the --variants (`VARIANTS`), timed like reallocate_s and
                 checked against its output, e.g. "old" = the cell-classes implementation (its planner, every
                 cell packed, serial schedule) next to the new one on the same machine, "packed" = the new
                 planner with every cell packed, "gather" = mode "reshard" (all-gather in the source mesh,
                 then each target device keeps its own buffers); `raw_copy_ratio_variants` = raw / each;
* reallocate_modes_s - {mode: seconds} for the planner modes of --modes whose plan differs from "auto"'s;
* device_put_s - naive `jax.device_put(tree, targets)`, timed ONCE (no warm-up: it is the slow
                 host-path baseline, 5-10 s for 7B; nothing in it compiles that a warm-up would hide);
* raw_copy_s   - the raw copy bound: every distinct source shard moved once by one batched
                 `device_put` of single-device shards, each to a target device other than its own
                 (round-robin); median of reps after one warm-up;
* predicted_s  - `realloc_cost` with the default `Hardware` profile (in the library at run time), with
                 predicted_{serial,pipelined,unbucketed,variants,modes}_s, the plan's counts (programs,
                 transfers, arrays, direct classes) and predicted host and device times, for --fit;
* peak_bytes_per_device - `peak_bytes_in_use` per device right after the default reallocations (a
                 running max over the process: it cannot be reset), with bytes_in_use before them.

The JSON is rewritten after every record, so a run cut off keeps what it measured; --budget stops
starting new transitions after that many seconds.

--fit FILE [FILE ...] checks `realloc_cost` against results files on CPU (plans are pure; the plans each
run executed are rebuilt: the cell-classes planner for files of that implementation, one batched
device_put per bucket for files from before issue rounds): per file, link bandwidth and per-transfer
latency from the run's own raw copies (not fitted), collective bandwidth = that link bandwidth, then the
HBM copy rate, the per-collective latency and the per-program dispatch time by a grid search and the other
host terms (leaf_arg_s, collective_host_s) by non-negative least squares on the unbucketed calls' host
times; it prints predicted/measured per timed variant with the library profile, in sample and
leave-one-record-out, and how many are within 25% (before: the `predicted_s` the run recorded).
--fit FILE FILE ... --joint fits ONE profile to several runs on one machine kind (how `hardware.H200_X4` was
made) and checks it out of sample: fitted on each file alone, its errors on the others.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import os
import statistics
import sys
import time

if {"--small", "--fit", "--table"} & set(sys.argv):
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from sharding import _realloc_plan as plan_mod  # noqa: E402
from sharding import hardware as hw_mod  # noqa: E402
from sharding import realloc as realloc_mod  # noqa: E402
from sharding._realloc_plan import LeafSpec, plan_tree, price, timeline  # noqa: E402
from sharding.mesh import Layout  # noqa: E402
from sharding.realloc import DEFAULT_BUCKET_BYTES, realloc_cost, reallocate  # noqa: E402
from sharding.rules import PARAM_RULES, spec_for  # noqa: E402

MODELS = {  # per_layer trees: vocab, embed D, mlp F, layers L (LLaMA-2 7B: 6.74e9 params; TinyLlama-1.1B-shaped).
    "7b": (32000, 4096, 11008, 32),
    "1b": (32000, 2048, 5632, 22),
    "tiny": (512, 64, 128, 32),
}
# stacked trees: real_jax's own Transformer (`real_jax.models.abstract_model`), layers stacked along a
# leading axis, bf16 parameters: the preset ("7b" = LLaMA-2 7B, "1b" = LLaMA-3.2-1B, tied embeddings)
# with field overrides.
STACKED = {"7b": ("7b", {}), "1b": ("1b", {}), "tiny": ("tiny", {"n_layers": 32, "vocab_size": 512})}
TREES = ("stacked", "per_layer")


def param_shapes(model, tree="per_layer"):
  """{name: (shape, logical axes)} of the model's parameter tree, names in the order `jax.tree.flatten`
  walks them (sorted), so bucket order here is reallocate's."""
  if tree == "stacked":
    return stacked_param_shapes(model)
  if tree != "per_layer":
    raise ValueError(f"tree must be one of {TREES}, got {tree!r}")
  v, d, f, n = MODELS[model]
  out = {"embed": ((v, d), ("vocab", "embed")), "final_norm": ((d,), ("embed",)),
         "lm_head": ((d, v), ("embed", "vocab"))}
  for i in range(n):
    p = f"layer{i:02d}."
    out.update({p + "attn_norm": ((d,), ("embed",)), p + "mlp_norm": ((d,), ("embed",)),
                p + "wq": ((d, d), ("embed", "heads")), p + "wk": ((d, d), ("embed", "kv_heads")),
                p + "wv": ((d, d), ("embed", "kv_heads")), p + "wo": ((d, d), ("heads", "embed")),
                p + "w1": ((d, f), ("embed", "mlp")), p + "w3": ((d, f), ("embed", "mlp")),
                p + "w2": ((f, d), ("mlp", "embed"))})
  return {k: out[k] for k in sorted(out)}


def stacked_param_shapes(model):
  """real_jax's Transformer parameters (nnx state of `abstract_model`, bf16), as reallocate sees them
  (`real_jax.runtime.engine.reallocate_state` flattens the state the same way)."""
  from flax import nnx
  from real_jax.models.config import get_config
  from real_jax.models.transformer import abstract_model
  from sharding.rules import logical_axes_of
  preset, overrides = STACKED[model]
  cfg = get_config(preset, param_dtype="bfloat16", **overrides)
  state = nnx.state(abstract_model(cfg))
  out = {}
  for path, v in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    val = v.get_value() if hasattr(v, "get_value") else v.value
    assert val.dtype == jnp.bfloat16, (path, val.dtype)
    out[".".join(str(getattr(k, "key", k)) for k in path)] = (tuple(val.shape), logical_axes_of(v))
  assert list(out) == sorted(out), list(out)
  return out


def shardings(shapes, layout):
  rules = PARAM_RULES[layout.rules]
  return {k: NamedSharding(layout.mesh, spec_for(ax, s, layout, rules, what=k)) for k, (s, ax) in shapes.items()}


TRANSITIONS_BY_DEVICES = {  # devices -> [(name, source layout, target layout)]
    4: [("fsdp4->tensor4", Layout.on(0, fsdp=4), Layout.on(0, tensor=4)),
        ("fsdp4->tensor2(2 of 4)", Layout.on(0, fsdp=4), Layout.on(0, tensor=2)),
        ("tensor2(2 of 4)->fsdp4", Layout.on(0, tensor=2), Layout.on(0, fsdp=4)),
        ("data2xtensor2->fsdp4", Layout.on(0, data=2, tensor=2), Layout.on(0, fsdp=4))],
    # The 2-GPU analogues: same devices (all-to-all), N -> fewer, fewer -> N, replicated -> sharded.
    2: [("fsdp2->tensor2", Layout.on(0, fsdp=2), Layout.on(0, tensor=2)),
        ("fsdp2->single(1 of 2)", Layout.on(0, fsdp=2), Layout.on(0)),
        ("single(1 of 2)->fsdp2", Layout.on(0), Layout.on(0, fsdp=2)),
        ("data2->fsdp2", Layout.on(0, data=2), Layout.on(0, fsdp=2))],
}
TRANSITIONS = TRANSITIONS_BY_DEVICES[4]
LAYOUTS = {n: (s, t) for ts in TRANSITIONS_BY_DEVICES.values() for n, s, t in ts}


def make_source(shapes, shs):
  """Parameters filled on device (no host transfer), distinct values per element."""
  out = {}
  for k, (shape, _) in shapes.items():
    out[k] = _fill(shape, shs[k])()
  return out


_FILLS = {}


def _fill(shape, sh):
  if (shape, sh) not in _FILLS:
    def f():
      x = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
      for i in range(1, len(shape)):
        x = x * 7 + jax.lax.broadcasted_iota(jnp.int32, shape, i)
      return (x % 1999).astype(jnp.bfloat16)
    _FILLS[shape, sh] = jax.jit(f, out_shardings=sh)
  return _FILLS[shape, sh]


_equal = jax.jit(lambda a, b: jnp.all(jnp.stack([jnp.array_equal(a[k], b[k]) for k in a])))


def ready(tree):
  jax.block_until_ready(tree)


def delete(tree, keep=None):
  """Deletes the arrays of `tree`, except those sharing a buffer with `keep` (reallocate may hand
  back source buffers where a target shard is a source shard)."""
  kept = set()
  if keep is not None:
    kept = {sh.data.unsafe_buffer_pointer() for x in jax.tree.leaves(keep) for sh in x.addressable_shards}
  for x in jax.tree.leaves(tree):
    if x.is_deleted():
      continue
    if kept and any(sh.data.unsafe_buffer_pointer() in kept for sh in x.addressable_shards):
      continue
    x.delete()


def mem():
  stats = [d.memory_stats() or {} for d in jax.local_devices()]
  return [s.get("bytes_in_use", 0) for s in stats], [s.get("peak_bytes_in_use", 0) for s in stats]


def raw_copy_fn(x, target_layout):
  """The array bytes by plain copies: one source shard per distinct source region, each to a
  distinct target device other than its own (round-robin), all in one batched device_put."""
  devs = target_layout.mesh.devices.flatten().tolist()
  others = [d for d in jax.devices() if d not in devs]
  xs, ds = [], []
  turn = 0
  for a in jax.tree.leaves(x):
    seen = set()
    for sh in a.addressable_shards:
      key = tuple((s.start, s.stop) for s in sh.index)
      if key in seen:
        continue
      seen.add(key)
      cands = [d for d in devs if d != sh.device] or others
      xs.append(sh.data)
      ds.append(cands[turn % len(cands)])
      turn += 1
  pair = {}
  for v, d in zip(xs, ds):
    k = (list(v.devices())[0].id, d.id)
    pair[k] = pair.get(k, 0) + v.size * v.dtype.itemsize
  info = {"raw_copy_bytes": sum(v.size * v.dtype.itemsize for v in xs), "raw_copy_transfers": len(xs),
          "raw_copy_max_pair_bytes": max(pair.values()), "raw_copy_devices": len(set(ds))}
  return lambda: jax.device_put(xs, ds), info


def _specs(src_sh, dst_sh, shapes):
  return tuple(LeafSpec(tuple(shapes[k][0]), "bfloat16", src_sh[k], dst_sh[k]) for k in shapes)


# The profile `H100_SXM` had while the cell-classes implementation ran (its results' `hardware_default`):
# the "old" variant plans with it, as that implementation did.
OLD_PROFILE = hw_mod.Hardware(
    name="h100_sxm_cell_classes", devices_per_host=8, d2d_bandwidth=272e9, inter_host_bandwidth=45e9,
    hbm_bandwidth=2.15e12, intra_mesh_collective_bandwidth=225e9, transfer_latency_s=28e-6,
    d2d_device_bandwidth=272e9, dispatch_s=366e-6, collective_latency_s=40e-6, leaf_arg_s=3e-6,
    leaf_assemble_s=30e-6, call_s=7.5e-3)


@contextlib.contextmanager
def legacy_planner():
  """Leaf plans chosen as the cell-classes implementation chose them: its price of a reshard had no
  XLA layout copies, and a local slice counted as a collective. Bucket loads keep today's pricing
  (they are what the executed plan does on the device). Plans made inside are cached under their
  `Hardware` (use a profile of their own, e.g. `OLD_PROFILE`)."""
  leaf, reshard_bytes = plan_mod.plan_leaf, plan_mod.reshard_bytes

  def old_leaf(shape, itemsize, src, dst, hw, mode="auto", direct=True):
    plan_mod.reshard_bytes = lambda *a: (max(reshard_bytes(*a)[0], 1), 0)
    try:
      return leaf.__wrapped__(shape, itemsize, src, dst, hw, mode, direct)
    finally:
      plan_mod.reshard_bytes = reshard_bytes

  plan_mod.plan_leaf = old_leaf
  try:
    yield
  finally:
    plan_mod.plan_leaf = leaf


@contextlib.contextmanager
def one_round():
  """Plans made inside issue all of a bucket's copies in ONE batched device_put, as every implementation
  before issue rounds did (`_realloc_plan._transfer_slots`). They are cached under their `Hardware`: plan
  with a profile of their own name (`_one_round_hw`)."""
  slots = plan_mod._transfer_slots
  plan_mod._transfer_slots = lambda classes, transfers: {t: 0 for t in transfers}
  try:
    yield
  finally:
    plan_mod._transfer_slots = slots


def _one_round_hw(hw):
  return dataclasses.replace(hw, name=hw.name + " (one round)")


# Timed variants besides the default call: label -> reallocate keyword arguments ("legacy": planned by
# `legacy_planner` with OLD_PROFILE; "one_round": every copy of a bucket in one batched device_put).
VARIANTS = {
    "onecall": {"one_round": True},          # today's planner, copies not split into rounds
    "bucket2g": {"bucket_bytes": 2 << 30},   # buckets of 2 GiB (the default since 2026-11-27)
    "bucket1g": {"bucket_bytes": 1 << 30},   # buckets of 1 GiB (the default before)
    "old": {"direct": False, "schedule": "serial", "legacy": True},  # the cell-classes implementation
    "packed": {"direct": False},             # today's planner, every cell packed (whole shards too)
    "direct": {"direct": True},              # today's planner, whole shards as direct classes
    "gather": {"mode": "reshard"},           # all-gather (or any reshard) in the source mesh, no assembly
    "pieces": {"mode": "pieces"},            # no reshard: pieces of the source shards
}


def _call_kw(kw):
  """reallocate keyword arguments of a variant, and the context its plan is made in."""
  kw = dict(kw)
  if kw.pop("legacy", False):
    return {**kw, "hardware": OLD_PROFILE}, legacy_planner()
  if kw.pop("one_round", False):
    return {**kw, "hardware": _one_round_hw(kw.get("hardware") or hw_mod.local_default())}, one_round()
  return kw, contextlib.nullcontext()


def _tree_plan(src_sh, dst_sh, shapes, hw, kw, bucket_bytes=DEFAULT_BUCKET_BYTES):
  """The TreePlan reallocate executes with these keyword arguments (and the variant's planner)."""
  call, ctx = _call_kw({"hardware": hw, **kw} if kw.get("one_round") else kw)
  with ctx:
    return plan_tree(_specs(src_sh, dst_sh, shapes), call.get("hardware", hw), call.get("mode", "auto"),
                     call.get("bucket_bytes", bucket_bytes), call.get("schedule", realloc_mod.DEFAULT_SCHEDULE),
                     call.get("direct", realloc_mod.DEFAULT_DIRECT))


def plan_summary(src_sh, dst_sh, shapes, hw, kw=None):
  tp = _tree_plan(src_sh, dst_sh, shapes, hw, kw or {})
  kinds = [kd for b in tp.buckets for kd in b.kinds.values()]
  loads = [b.load for b in tp.buckets]
  return {"buckets": len(tp.buckets), "same_device_leaves": kinds.count("same"),
          "general_leaves": kinds.count("general"), "passthrough_leaves": kinds.count("passthrough"),
          "reshard_programs": sum(len(b.same) + len(b.reshard) for b in tp.buckets),
          "classes": sum(len(b.classes) for b in tp.buckets),
          "direct_classes": sum(c.shape is not None for b in tp.buckets for c in b.classes),
          "transfers": sum(len(b.transfers) for b in tp.buckets),
          "programs": sum(x.programs for x in loads), "assembled_arrays": sum(x.assembled_arrays for x in loads),
          "program_arrays": sum(x.program_arrays for x in loads),
          "packed_bytes_max_device": max([sum(x.packed.get(d, 0) for x in loads)
                                          for d in {d for x in loads for d in x.packed}], default=0),
          "relayout_bytes_per_device": sum(x.collective_hbm_bytes for x in loads),
          "schedule_chosen": tp.schedule,
          "predicted_host_s": tp.host_s,
          "predicted_device_serial_s": sum(b.device_s for b in tp.buckets),
          "predicted_link_s": sum(b.copy_s for b in tp.buckets),
          "plan_inter": sorted({str(p.inter.spec) + str(p.inter.mesh.axis_sizes) if p.inter else "source"
                                for b in tp.buckets for p in b.leaf_plans.values()})}


def _same_plan(src_sh, dst_sh, shapes, hw, kw):
  a, b = (_tree_plan(src_sh, dst_sh, shapes, hw, k) for k in ({}, kw))
  return [(x.kinds, x.leaf_plans, x.classes) for x in a.buckets] == [(x.kinds, x.leaf_plans, x.classes)
                                                                   for x in b.buckets] and a.schedule == b.schedule


def _timed(x, dst_sh, y, reps, **kw):
  """(total seconds, dispatch seconds) per rep of reallocate(x, dst_sh, **kw), and the last output."""
  ts, ds = [], []
  for _ in range(reps):
    delete(y, keep=x)
    t0 = time.perf_counter()
    y = reallocate(x, dst_sh, **kw)
    ds.append(time.perf_counter() - t0)
    ready(y)
    ts.append(time.perf_counter() - t0)
  return ts, ds, y


def host_phases(x, dst_sh, reps):
  """Where a warm unbucketed call's host time goes (nothing is waited for): median seconds per phase
  over `reps` calls, each jitted program call and the batched device_put timed until it returns,
  "python" = the rest of the call (flatten, plan lookup, views, arrays). Programs are wrapped only
  for these calls."""
  acc: dict = {}

  def timed(label, fn):
    def g(*a, **k):
      t0 = time.perf_counter()
      try:
        return fn(*a, **k)
      finally:
        acc[label] = acc.get(label, 0.0) + time.perf_counter() - t0
    return g

  y = reallocate(x, dst_sh, bucket_bytes=None)  # compiled by the unbucketed timing before
  ready(y)
  saved = []
  for progs, _ in list(realloc_mod._CALLS.values()):
    for p in progs:
      saved.append((p, p.same, p.reshard, p.packs, p.unpacks))
      p.same = [(ks, timed("reshard_programs", f)) for ks, f in p.same]
      p.reshard = [(ks, timed("reshard_programs", f)) for ks, f in p.reshard]
      p.packs = [(d, i, o, timed("pack_programs", f)) for d, i, o, f in p.packs]
      p.unpacks = [(i, ks, timed("unpack_programs", f)) for i, ks, f in p.unpacks]
  put = jax.device_put
  per: dict = {}
  try:
    jax.device_put = timed("device_put", put)
    for _ in range(reps):
      delete(y, keep=x)
      acc.clear()
      prev = y
      t0 = time.perf_counter()
      y = reallocate(x, dst_sh, bucket_bytes=None)
      total = time.perf_counter() - t0
      ready(y)
      del prev
      acc["python"] = total - sum(acc.values())
      acc["call"] = total
      for k, v in acc.items():
        per.setdefault(k, []).append(v)
  finally:
    jax.device_put = put
    for p, *old in saved:
      p.same, p.reshard, p.packs, p.unpacks = old
  delete(y, keep=x)
  return {k: statistics.median(v) for k, v in per.items()}


def _time_variant(x, dst_sh, y, reps, kw):
  """Compiling call + `reps` timed calls of reallocate with the variant's arguments (in its planner's
  context); returns (totals, dispatch times, last output)."""
  call, ctx = _call_kw(kw)
  with ctx:
    delete(y, keep=x)
    y = reallocate(x, dst_sh, **call)
    ready(y)
    return _timed(x, dst_sh, y, reps, **call)


def bench(model, name, src_layout, dst_layout, reps, hw, modes=(), tree="stacked", variants=()):
  shapes = param_shapes(model, tree)
  src_sh, dst_sh = shardings(shapes, src_layout), shardings(shapes, dst_layout)
  nbytes = sum(int(np.prod(s)) * 2 for s, _ in shapes.values())
  abstract = {k: jax.ShapeDtypeStruct(s, jnp.bfloat16) for k, (s, _) in shapes.items()}
  t_start = time.perf_counter()
  x = make_source(shapes, src_sh)
  ready(x)
  use0, peak0 = mem()
  # reallocate (its defaults): warm-up (compiles, plans) + reps; keep the last output for the value check.
  t0 = time.perf_counter()
  y = reallocate(x, dst_sh)
  ready(y)
  warm_s = time.perf_counter() - t0
  r_ts, r_disp, y = _timed(x, dst_sh, y, reps)
  use1, peak1 = mem()
  ok_sharding = all(y[k].sharding == dst_sh[k] for k in y)
  ref = y
  # A/B on the same machine (after the peak reading): both schedules forced, no buckets at all (nothing
  # waited for: the dispatch time is the host time), the variants and the other planner modes, each
  # checked against the default output.
  extra = {"reallocate_variants_s": {}, "reallocate_variants_all_s": {}, "reallocate_variants_dispatch_s": {},
           "reallocate_modes_s": {}, "reallocate_modes_all_s": {}}
  y = None
  timed = [(sc, {"schedule": sc}) for sc in realloc_mod.SCHEDULES] + [("unbucketed", {"bucket_bytes": None})]
  timed += [(f"variant:{v}", VARIANTS[v]) for v in variants]
  timed += [(f"mode:{m}", {"mode": m}) for m in modes if not _same_plan(src_sh, dst_sh, shapes, hw, {"mode": m})]
  for label, kw in timed:
    ts, ds, y = _time_variant(x, dst_sh, y, reps, kw)
    ok_sharding = ok_sharding and all(y[k].sharding == dst_sh[k] for k in y) and bool(_equal(y, ref))
    delete(y, keep=x)
    y = None
    kind, _, key = label.rpartition(":")
    if not kind:
      extra[f"reallocate_{key}_s"], extra[f"reallocate_{key}_all_s"] = statistics.median(ts), ts
      extra[f"reallocate_{key}_dispatch_s"] = statistics.median(ds)
    else:
      extra[f"reallocate_{kind}s_s"][key] = statistics.median(ts)
      extra[f"reallocate_{kind}s_all_s"][key] = ts
      if kind == "variant":
        extra["reallocate_variants_dispatch_s"][key] = statistics.median(ds)
  extra["host_phases_s"] = host_phases(x, dst_sh, max(reps, 3))
  # Raw copy bound.
  f, raw = raw_copy_fn(x, dst_layout)
  c = f()
  ready(c)
  c_ts = []
  for _ in range(reps):
    delete(c)
    t0 = time.perf_counter()
    c = f()
    ready(c)
    c_ts.append(time.perf_counter() - t0)
  delete(c)
  # Naive device_put, once, from a fresh source (it caches a host copy on its input).
  xs = make_source(shapes, src_sh)
  ready(xs)
  t0 = time.perf_counter()
  d = jax.device_put(xs, dst_sh)
  ready(d)
  d_s = time.perf_counter() - t0
  values_equal = bool(_equal(ref, d)) and ok_sharding
  delete(d)
  delete(xs)
  delete(ref, keep=x)
  delete(x)

  def cost(kw, bucket_bytes=DEFAULT_BUCKET_BYTES):
    """realloc_cost of the variant's plan priced with the library profile (a legacy plan is made with
    OLD_PROFILE, as it ran, but priced like the others)."""
    kw = dict(kw)
    bucket_bytes = kw.pop("bucket_bytes", bucket_bytes)
    if not (kw.get("legacy") or kw.get("one_round")):
      return realloc_cost(src_sh, dst_sh, abstract, hw, bucket_bytes=bucket_bytes, **kw)
    tp = _tree_plan(src_sh, dst_sh, shapes, hw, kw, bucket_bytes)
    return timeline([b.load for b in tp.buckets], hw, tp.schedule, bucket_bytes is not None)[1]

  rec = {
      "model": model, "tree": tree, "schedule": realloc_mod.DEFAULT_SCHEDULE, "transition": name,
      "source": str(src_layout), "target": str(dst_layout),
      "leaves": len(shapes), "bytes": nbytes,
      "reallocate_s": statistics.median(r_ts), "reallocate_all_s": r_ts,
      "reallocate_dispatch_s": statistics.median(r_disp), "reallocate_first_call_s": warm_s,
      "device_put_s": d_s,
      "raw_copy_s": statistics.median(c_ts), "raw_copy_all_s": c_ts, **raw,
      **extra,
      "predicted_s": cost({}),
      **{f"predicted_{sc}_s": cost({"schedule": sc}) for sc in realloc_mod.SCHEDULES},
      "predicted_unbucketed_s": cost({}, None),
      "predicted_variants_s": {v: cost(VARIANTS[v]) for v in extra["reallocate_variants_s"]},
      "predicted_modes_s": {m: cost({"mode": m}) for m in extra["reallocate_modes_s"]},
      **plan_summary(src_sh, dst_sh, shapes, hw),
      "bytes_in_use_before_per_device": use0, "peak_bytes_before_per_device": peak0,
      "peak_bytes_per_device": peak1,
      "values_equal": values_equal,
      "wall_s": time.perf_counter() - t_start,
  }
  rec["raw_copy_ratio"] = rec["raw_copy_s"] / rec["reallocate_s"]
  rec["raw_copy_ratio_variants"] = {v: rec["raw_copy_s"] / t for v, t in rec["reallocate_variants_s"].items()}
  rec["speedup_vs_device_put"] = rec["device_put_s"] / rec["reallocate_s"]
  rec["predicted_over_measured"] = rec["predicted_s"] / rec["reallocate_s"]
  return rec


IMPLEMENTATION = "rounds"  # Recorded in results; --fit rebuilds the plans each implementation executed.
ONE_ROUND_IMPLEMENTATION = "direct-classes"  # Before issue rounds: every copy of a bucket in one device_put.
LEGACY_IMPLEMENTATION = "cell-classes"  # Before direct classes: its planner (`legacy_planner`), every cell packed.


def _measured(rec, direct):
  """{variant: (reallocate keyword arguments, bucketed, measured seconds)} of a record whose run's default
  was `direct`. Files of the cell-classes implementation had a fixed default schedule (pipelined when the
  record does not say)."""
  default = rec.get("schedule_chosen") or rec.get("schedule", "pipelined")
  out = {"default": ({"schedule": default, "direct": direct}, True, rec["reallocate_s"])}
  for sc in realloc_mod.SCHEDULES:
    if f"reallocate_{sc}_s" in rec:
      out[sc] = ({"schedule": sc, "direct": direct}, True, rec[f"reallocate_{sc}_s"])
  out["unbucketed"] = ({"schedule": default, "direct": direct}, False, rec["reallocate_unbucketed_s"])
  for m, t in rec.get("reallocate_modes_s", {}).items():
    out[m] = ({"mode": m, "schedule": default, "direct": direct}, True, t)
  for v, t in rec.get("reallocate_variants_s", {}).items():
    out[v] = (VARIANTS[v], True, t)
  return out


def _raw_copy_out_bytes(rec):
  """The most bytes one device sent in the record's raw copy (`raw_copy_fn`: the first device holding
  each distinct source region sends it)."""
  shapes = param_shapes(rec["model"], rec.get("tree", "per_layer"))
  src = shardings(shapes, LAYOUTS[rec["transition"]][0])
  out: dict = {}
  for k, (shape, _) in shapes.items():
    seen = set()
    for d, idx in src[k].devices_indices_map(shape).items():
      box = tuple((s.start or 0, n if s.stop is None else s.stop) for s, n in zip(idx, shape))
      if box not in seen:
        seen.add(box)
        out[d] = out.get(d, 0) + math.prod(b - a for a, b in box) * 2
  return max(out.values())


def link_profile(data, base):
  """`base` with the link terms of a run's own raw copies: bandwidth = the fastest record's bytes out of
  its busiest device per second (the collectives run on the same links), latency per copied buffer =
  the median of what the rest of each record's time leaves per transfer."""
  recs = data["records"]
  bw = max(_raw_copy_out_bytes(r) / r["raw_copy_s"] for r in recs)
  lat = statistics.median(max(0.0, r["raw_copy_s"] - _raw_copy_out_bytes(r) / bw) / r["raw_copy_transfers"]
                          for r in recs)
  return dataclasses.replace(base, d2d_bandwidth=bw, d2d_device_bandwidth=bw, intra_mesh_collective_bandwidth=bw,
                             transfer_latency_s=lat)


def _fit_rows(data):
  """Per record: (record, {variant: (bucket loads, schedule, bucketed, measured)}, (unbucketed loads, host
  seconds)), with the plans the run executed (planned with the run's library profile)."""
  bb = data.get("bucket_bytes", DEFAULT_BUCKET_BYTES)
  legacy = data.get("implementation") == LEGACY_IMPLEMENTATION
  known = (IMPLEMENTATION, ONE_ROUND_IMPLEMENTATION, LEGACY_IMPLEMENTATION)
  if data.get("implementation") not in known:
    raise SystemExit(f"results of implementation {data.get('implementation')!r}: none of {known}, whose plans "
                     "--fit can rebuild")
  one = data.get("implementation") != IMPLEMENTATION  # ran before issue rounds
  run_hw = hw_mod.Hardware.from_dict(data["hardware_default"])
  # The default call's `direct`: recorded since DEFAULT_DIRECT became False; earlier direct-classes runs
  # had direct classes on by default.
  direct = data.get("direct_default", True)
  rows = []
  for rec in data["records"]:
    shapes = param_shapes(rec["model"], rec.get("tree", "per_layer"))
    src_sh, dst_sh = (shardings(shapes, lay) for lay in LAYOUTS[rec["transition"]])
    variants = {}
    for label, (kw, bucketed, measured) in _measured(rec, direct).items():
      kw = {**kw, "direct": False, "legacy": True} if legacy else kw
      plan_hw = run_hw if legacy or not kw.get("legacy") else OLD_PROFILE
      call, call_ctx = _call_kw(kw)
      with contextlib.ExitStack() as ctx:
        ctx.enter_context(call_ctx)  # the variant's planner: legacy, one round, or today's
        if one or kw.get("one_round"):
          plan_hw = _one_round_hw(plan_hw)  # plans cached apart from today's
          if not kw.get("one_round"):
            ctx.enter_context(one_round())  # the run's own default: before issue rounds
        tp = plan_tree(_specs(src_sh, dst_sh, shapes), plan_hw, call.get("mode", "auto"),
                       call.get("bucket_bytes", bb) if bucketed else None,
                       call.get("schedule", realloc_mod.DEFAULT_SCHEDULE), call.get("direct", direct))
      variants[label] = ([b.load for b in tp.buckets], tp.schedule, bucketed, measured)
    rows.append((rec, variants, (variants["unbucketed"][0], rec["reallocate_unbucketed_dispatch_s"])))
  return rows


# By least squares on the host times; call_s (the call's Python prologue) is held at the profile's value,
# measured as the "python" host phase of slice-only calls: a free constant would absorb the per-program and
# per-array costs of the general path's calls and overprice every short call (2x H100: 0.91 ms fitted, while a
# slice-only call returns after 0.3-0.5 ms).
# dispatch_s is on the grid, not in the least squares: every unbucketed call is ONE bucket, so their host
# times cannot tell a program's dispatch from its arrays (both 4x H200 runs fitted dispatch_s = 0 and ~19 us
# per array, which underprices the 9-bucket calls' ~1.5 ms of host time per bucket); the bucketed calls'
# totals, which the grid's objective sees, can.
HOST_FIT = ("leaf_arg_s", "collective_host_s")
HBM_GRID = tuple(x * 1e11 for x in range(16, 46, 2))       # HBM copy rate, bytes read + written per second
LATENCY_GRID = (0.0, 5e-6, 10e-6, 15e-6, 20e-6, 30e-6, 40e-6, 60e-6)  # device time per collective
DISPATCH_GRID = (0.0, 50e-6, 100e-6, 150e-6, 200e-6, 270e-6)  # host time per program and per batched device_put


def fit_host(host_rows, hw):
  """`HOST_FIT` by non-negative least squares on host times (unbucketed calls' time until return: nothing
  is waited for), the other host terms held at `hw`'s values (the host time is linear in each term)."""
  from scipy.optimize import nnls
  zero = dataclasses.replace(hw, **{k: 0.0 for k in HOST_FIT})
  units = [dataclasses.replace(zero, **{k: 1.0}) for k in HOST_FIT]
  a, y = [], []
  for loads, h in host_rows:
    fixed = zero.call_s + sum(price(x, zero)[0] for x in loads)
    a.append([sum(price(x, u)[0] for x in loads) - fixed + zero.call_s for u in units])
    y.append(h - fixed)
  coef, _ = nnls(np.array(a), np.array(y))
  return dataclasses.replace(hw, **dict(zip(HOST_FIT, map(float, coef))))


def _predict(variants, hw):
  return {label: timeline(loads, hw, sched, bucketed)[1] / m - 1
          for label, (loads, sched, bucketed, m) in variants.items()}


def fit_profile(rows, base):
  """The profile minimising the mean |log(predicted / measured)| over every timed variant of `rows`:
  `base` (link terms from the raw copies) with hbm_bandwidth, collective_latency_s and dispatch_s from a
  grid and the other host terms fitted by `fit_host` at each grid point."""
  best = None
  for hbm, lat, disp in itertools.product(HBM_GRID, LATENCY_GRID, DISPATCH_GRID):
    hw = fit_host([h for *_, h in rows], dataclasses.replace(base, hbm_bandwidth=hbm, collective_latency_s=lat,
                                                             dispatch_s=disp))
    err = statistics.mean(abs(math.log1p(e)) for _, v, _ in rows for e in _predict(v, hw).values())
    if best is None or err < best[0]:
      best = (err, hw)
  return best[1]


def _within(errs):
  return f"{sum(abs(e) <= 0.25 for e in errs)} of {len(errs)}"


def fit(paths):
  """Checks `realloc_cost` against results files (see the module docstring); prints per variant
  predicted/measured - 1 with the library profile, in sample and leave-one-record-out."""
  for path in paths:
    with open(path) as f:
      data = json.load(f)
    rows = _fit_rows(data)
    lib = hw_mod.for_machine(data.get("card", ""), data.get("devices", 0))
    base = link_profile(data, lib)
    full = fit_profile(rows, base)
    print(f"{path}: {data.get('card')}, library profile {lib.name}; {len(rows)} records, implementation "
          f"{data.get('implementation')}, default direct={data.get('direct_default', data.get('implementation') == IMPLEMENTATION)}; link from the raw copies: "
          f"{base.d2d_bandwidth / 1e9:.0f} GB/s, {base.transfer_latency_s * 1e6:.0f} us per transfer")
    print(f"in sample: hbm {full.hbm_bandwidth / 1e12:.1f} TB/s, collective latency {full.collective_latency_s * 1e6:.0f}"
          f" us, call_s {full.call_s * 1e3:.2f} ms (held), dispatch_s {full.dispatch_s * 1e6:.0f} us, leaf_arg_s "
          f"{full.leaf_arg_s * 1e6:.1f} us, collective_host_s {full.collective_host_s * 1e6:.0f} us")
    print(f"{'tree':9s} {'model':5s} {'transition':24s} {'variant':10s} {'measured':>9s} {'recorded':>8s} "
          f"{'library':>8s} {'in-sample':>9s} {'leave-out':>9s}   (predicted/measured - 1)")
    errs: dict = {}
    loo_fits = []
    for i, (rec, variants, _) in enumerate(rows):
      loo = fit_profile([r for j, r in enumerate(rows) if j != i], base)
      loo_fits.append(loo)
      lib_e, ins, out = (_predict(variants, hw) for hw in (lib, full, loo))
      for label, (*_, m) in variants.items():
        recorded = rec["predicted_s"] / m - 1 if label == "default" else None
        for key, e in (("recorded", recorded), ("library", lib_e[label]), ("in-sample", ins[label]),
                       ("leave-out", out[label])):
          if e is not None:
            errs.setdefault((label == "default", key), []).append(e)
        rtext = f"{recorded:+8.0%}" if recorded is not None else f"{'':8s}"
        print(f"{rec.get('tree', 'per_layer'):9s} {rec['model']:5s} {rec['transition']:24s} {label:10s} "
              f"{m * 1e3:7.1f}ms {rtext} {lib_e[label]:+8.0%} {ins[label]:+9.0%} {out[label]:+9.0%}")
    for name, groups in (("default call", (True,)), ("every timed variant", (True, False))):
      print(f"within 25%, {name}: " + ", ".join(
          f"{key} {_within([e for g in groups for e in errs.get((g, key), [])])}"
          for key in ("recorded", "library", "in-sample", "leave-out") if len(groups) == 1 or key != "recorded"))
    for field in ("hbm_bandwidth", "collective_latency_s", "dispatch_s", *HOST_FIT):
      vals = [getattr(h, field) for h in loo_fits]
      print(f"leave-one-out {field}: {min(vals):.3g} .. {max(vals):.3g} (in sample {getattr(full, field):.3g})")
    print()


def fit_joint(paths):
  """One profile for one machine kind from several runs on it (`fit_profile` over all their records, the
  link terms from all their raw copies), and the out-of-sample check: fitted on each file alone, the
  errors on the others. Prints the profile's fields and predicted/measured - 1 per record."""
  runs = []
  for path in paths:
    with open(path) as f:
      runs.append((path, json.load(f)))
  lib = hw_mod.for_machine(runs[0][1].get("card", ""), runs[0][1].get("devices", 0))
  rows = {path: _fit_rows(data) for path, data in runs}
  pooled = link_profile({"records": [r for _, data in runs for r in data["records"]]}, lib)
  full = fit_profile([r for p, _ in runs for r in rows[p]], pooled)
  keys = ("d2d_bandwidth", "transfer_latency_s", "hbm_bandwidth", "collective_latency_s", "dispatch_s", *HOST_FIT)
  print(f"joint fit of {len(paths)} runs ({', '.join(paths)}): " + ", ".join(f"{k} {getattr(full, k):.4g}" for k in keys))
  fits = {p: fit_profile(rows[p], link_profile(data, lib)) for p, data in runs}
  print(f"{'file':44s} {'model':5s} {'transition':24s} {'measured':>9s} {'joint':>6s} {'other':>6s}   (default call, "
        "predicted/measured - 1; other: fitted on the other files alone)")
  counts = {"joint": [], "other": []}
  for path, _ in runs:
    for i, (rec, variants, _) in enumerate(rows[path]):
      joint = _predict(variants, full)["default"]
      others = [_predict(variants, hw)["default"] for p, hw in fits.items() if p != path]
      counts["joint"].append(joint)
      counts["other"] += others
      print(f"{path[-44:]:44s} {rec['model']:5s} {rec['transition']:24s} {variants['default'][3] * 1e3:7.1f}ms "
            f"{joint:+6.0%} " + " ".join(f"{e:+6.0%}" for e in others))
  print(f"within 25%, default call: joint {_within(counts['joint'])}, fitted on another file {_within(counts['other'])}")


def table(path):
  """The README table of a results file (times in ms, device_put in s)."""
  with open(path) as f:
    data = json.load(f)
  print(f"{data['card']}, jax {data['jax']}, {data['date']}, implementation {data.get('implementation')}, "
        f"{len(data['records'])} records, {data.get('total_wall_s', 0):.0f} s")
  print("| tree | model | transition | realloc (dispatch) | schedule | serial | pipelined | variants | raw copy "
        "| raw/realloc | device_put | speedup | predicted |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in data["records"]:
    var = {**r.get("reallocate_variants_s", {}), **r.get("reallocate_modes_s", {})}
    var = ", ".join(f"{m} {t * 1e3:.1f}" for m, t in var.items()) or "-"
    sched = [f"{r[k] * 1e3:.1f}" if k in r else "-" for k in ("reallocate_serial_s", "reallocate_pipelined_s")]
    print(f"| {r.get('tree', 'per_layer')} | {r['model'].upper()} | {r['transition']} | {r['reallocate_s'] * 1e3:.1f} "
          f"({r.get('reallocate_dispatch_s', 0) * 1e3:.1f}) | {r.get('schedule_chosen', r.get('schedule', '-'))} | "
          f"{sched[0]} | {sched[1]} | {var} | {r['raw_copy_s'] * 1e3:.1f} | {r['raw_copy_s'] / r['reallocate_s']:.2f} | "
          f"{r['device_put_s']:.2f} | {r['device_put_s'] / r['reallocate_s']:.0f}x | "
          f"{r['predicted_s'] * 1e3:.1f} ({r['predicted_s'] / r['reallocate_s'] - 1:+.0%}) |")


def main():
  t_main = time.perf_counter()
  ap = argparse.ArgumentParser()
  ap.add_argument("--out")
  ap.add_argument("--fit", metavar="JSON", nargs="+", help="check realloc_cost against results files (on CPU)")
  ap.add_argument("--joint", action="store_true", help="with --fit: one profile fitted to all the files (runs on "
                  "one machine kind), checked on each file when fitted on the others")
  ap.add_argument("--table", metavar="JSON", help="print a results file as the README's markdown table")
  ap.add_argument("--modes", default="pieces,reshard", help="planner modes timed besides auto (comma list, or '')")
  ap.add_argument("--variants", default="old,packed",
                  help=f"comma list of timed variants ({', '.join(VARIANTS)}), or ''")
  ap.add_argument("--small", action="store_true", help="tiny model on 8 fake CPU devices (a smoke test)")
  ap.add_argument("--models", default=None)
  ap.add_argument("--tree", default="stacked",
                  help="parameter trees, comma list of stacked (real_jax's Transformer, default) and per_layer")
  ap.add_argument("--devices", type=int, default=None, choices=sorted(TRANSITIONS_BY_DEVICES),
                  help="transition set (default 4; 2: the 2-GPU analogues)")
  ap.add_argument("--transitions", default=None, help="comma list of transition names of the set (default: all)")
  ap.add_argument("--reps", type=int, default=2)
  ap.add_argument("--budget", type=float, default=360.0, help="start no transition after this many seconds")
  args = ap.parse_args()
  if args.fit:
    return fit_joint(args.fit) if args.joint else fit(args.fit)
  if args.table:
    return table(args.table)
  if not args.out:
    ap.error("--out is required (or --fit / --table)")
  modes = [m for m in args.modes.split(",") if m]
  variants = [v for v in args.variants.split(",") if v]
  if set(variants) - set(VARIANTS):
    ap.error(f"--variants: unknown {sorted(set(variants) - set(VARIANTS))}; known: {', '.join(VARIANTS)}")
  trees = [t for t in args.tree.split(",") if t]
  if not trees or set(trees) - set(TREES):
    ap.error(f"--tree: comma list of {TREES}")
  models = args.models.split(",") if args.models else (["tiny"] if args.small else ["7b", "1b"])
  n_dev = args.devices or 4
  if jax.device_count() < n_dev:
    ap.error(f"--devices {n_dev}: only {jax.device_count()} devices")
  transitions = TRANSITIONS_BY_DEVICES[n_dev]
  if args.transitions:
    names = args.transitions.split(",")
    unknown = set(names) - {n for n, *_ in transitions}
    if unknown:
      ap.error(f"--transitions: unknown {sorted(unknown)}; known: {', '.join(n for n, *_ in transitions)}")
    transitions = [t for t in transitions if t[0] in names]
  dev = jax.devices()[0]
  hw = hw_mod.local_default()  # what reallocate plans with when given no profile
  out = {"card": dev.device_kind, "platform": dev.platform, "devices": jax.device_count(), "jax": jax.__version__,
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "implementation": IMPLEMENTATION, "reps": args.reps, "bucket_bytes": DEFAULT_BUCKET_BYTES,
         "schedule": realloc_mod.DEFAULT_SCHEDULE, "direct_default": realloc_mod.DEFAULT_DIRECT,
         "transition_devices": n_dev, "trees": trees,
         "variants": {v: VARIANTS[v] for v in variants}, "hardware_default": hw.to_dict(),
         "hardware_old": OLD_PROFILE.to_dict(), "complete": False, "records": []}
  if os.path.exists(args.out):  # Earlier runs stay in the file, oldest first.
    with open(args.out) as f:
      old = json.load(f)
    runs = old.pop("previous_runs", [])
    if "previous_run" in old:
      runs.append(old.pop("previous_run"))
    out["previous_runs"] = runs + [old]
  for tree in trees:
    for model in models:
      for name, s, t in transitions:
        if time.perf_counter() - t_main > args.budget:
          print(f"budget: skipping {tree} {model} {name}", flush=True)
          continue
        rec = bench(model, name, s, t, args.reps, hw, modes, tree, variants)
        out["records"].append(rec)
        with open(args.out, "w") as f:
          json.dump(out, f, indent=1)
        print(json.dumps({k: rec.get(k) for k in (
            "tree", "model", "transition", "bytes", "leaves", "reallocate_s", "schedule_chosen", "reallocate_dispatch_s",
            "reallocate_serial_s", "reallocate_pipelined_s", "reallocate_unbucketed_s",
            "reallocate_unbucketed_dispatch_s", "reallocate_variants_s", "reallocate_modes_s", "device_put_s",
            "raw_copy_s", "raw_copy_ratio", "raw_copy_ratio_variants", "predicted_s", "values_equal",
            "host_phases_s", "wall_s")}), flush=True)
  out["complete"] = len(out["records"]) == len(trees) * len(models) * len(transitions)
  out["total_wall_s"] = time.perf_counter() - t_main
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()

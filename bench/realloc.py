"""Benchmark of `sharding.reallocate` against naive `jax.device_put` and the raw copy bound.

  PYTHONPATH=$PWD python bench/realloc.py --out bench/results/realloc-h100.json      # 4 GPUs
  PYTHONPATH=$PWD python bench/realloc.py --small --out /tmp/realloc-cpu.json        # 8 fake CPUs
  PYTHONPATH=$PWD python bench/realloc.py --fit bench/results/realloc-h100.json      # refit, on CPU
  PYTHONPATH=$PWD python bench/realloc.py --table bench/results/realloc-h100.json    # README table

For each model (LLaMA-7B- and 1B-shaped bf16 parameter trees, 291 and 201 leaves; --small: tiny
ones with as many leaves as 7B on 8 fake CPU devices) and each transition it measures:

* reallocate_s - `reallocate(tree, targets)` until every output is ready: median of --reps after
                 one warm-up (the warm-up compiles and caches the plan); reallocate_dispatch_s is the
                 time until the call returns (host work plus waits for earlier buckets), same reps;
                 reallocate_serial_s: the same with the pre-pipelining bucket schedule
                 (`realloc._PIPELINE = False`); reallocate_unbucketed_s with bucket_bytes=None (after
                 one compiling call) and reallocate_unbucketed_dispatch_s its time until return: with
                 nothing waited for, that is the host time of the call (GPUs run programs
                 asynchronously; the CPU backend runs small programs inline, so on CPU it includes them);
* reallocate_modes_s - {mode: seconds} for the planner modes of --modes ("pieces", "reshard") whose
                 plan differs from "auto"'s, timed like reallocate_s (for the choice the profile makes);
* device_put_s - naive `jax.device_put(tree, targets)`, timed ONCE (no warm-up: it is the slow
                 host-path baseline, 5-10 s for 7B; nothing in it compiles that a warm-up would hide);
* raw_copy_s   - the raw copy bound: every distinct source shard moved once by one batched
                 `device_put` of single-device shards, each to a target device other than its own
                 (round-robin); median of reps after one warm-up;
* predicted_s  - `realloc_cost` with the default `Hardware` profile (in the library at run time),
                 with the plan's counts (programs, transfers, arrays) and predicted host and device
                 times, for --fit;
* peak_bytes_per_device - `peak_bytes_in_use` per device right after the reallocations (a running
                 max over the process: it cannot be reset), with bytes_in_use before them.

The JSON is rewritten after every record, so a run cut off keeps what it measured; --budget stops
starting new transitions after that many seconds.

--fit JSON refits the `Hardware` profile to a results file (no accelerator needed: plans are pure
and the loads of the plans the run executed are repriced): host terms start from non-negative
least squares on the unbucketed calls' host times, then every term moves by coordinate descent on
the log errors of every timed variant and of those host times; prints predicted/measured per
variant under the run's and the fitted profile, the fitted terms, and which auto plans change.
"""

from __future__ import annotations

import argparse
import datetime
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

from sharding import hardware as hw_mod  # noqa: E402
from sharding.mesh import Layout  # noqa: E402
from sharding._realloc_plan import LeafSpec, plan_tree, price, tree_seconds  # noqa: E402
from sharding import realloc as realloc_mod  # noqa: E402
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


def plan_summary(src_sh, dst_sh, shapes, hw, mode="auto", bucket_bytes=DEFAULT_BUCKET_BYTES):
  tp = plan_tree(_specs(src_sh, dst_sh, shapes), hw, mode, bucket_bytes)
  kinds = [kd for b in tp.buckets for kd in b.kinds.values()]
  loads = [b.load for b in tp.buckets]
  return {"buckets": len(tp.buckets), "same_device_leaves": kinds.count("same"),
          "general_leaves": kinds.count("general"), "passthrough_leaves": kinds.count("passthrough"),
          "reshard_programs": sum(len(b.same) + len(b.reshard) for b in tp.buckets),
          "classes": sum(len(b.classes) for b in tp.buckets),
          "transfers": sum(len(b.transfers) for b in tp.buckets),
          "programs": sum(x.programs for x in loads), "assembled_arrays": sum(x.assembled_arrays for x in loads),
          "program_arrays": sum(x.program_arrays for x in loads),
          "predicted_host_s": sum(b.host_s for b in tp.buckets),
          "predicted_device_serial_s": sum(b.device_s for b in tp.buckets),
          "predicted_link_s": sum(b.copy_s for b in tp.buckets),
          "plan_inter": sorted({str(p.inter.spec) + str(p.inter.mesh.axis_sizes) if p.inter else "source"
                                for b in tp.buckets for p in b.leaf_plans.values()})}


def _same_plan(src_sh, dst_sh, shapes, hw, mode):
  specs = _specs(src_sh, dst_sh, shapes)
  a, b = (plan_tree(specs, hw, m, DEFAULT_BUCKET_BYTES) for m in ("auto", mode))
  return [(x.kinds, x.leaf_plans) for x in a.buckets] == [(x.kinds, x.leaf_plans) for x in b.buckets]


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
  for progs in list(realloc_mod._CALLS.values()):
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


def bench(model, name, src_layout, dst_layout, reps, hw, modes=(), tree="stacked"):
  shapes = param_shapes(model, tree)
  src_sh, dst_sh = shardings(shapes, src_layout), shardings(shapes, dst_layout)
  nbytes = sum(int(np.prod(s)) * 2 for s, _ in shapes.values())
  abstract = {k: jax.ShapeDtypeStruct(s, jnp.bfloat16) for k, (s, _) in shapes.items()}
  t_start = time.perf_counter()
  x = make_source(shapes, src_sh)
  ready(x)
  use0, peak0 = mem()
  # reallocate (default schedule): warm-up (compiles, plans) + reps; keep the last output for the value check.
  t0 = time.perf_counter()
  y = reallocate(x, dst_sh)
  ready(y)
  warm_s = time.perf_counter() - t0
  r_ts, r_disp, y = _timed(x, dst_sh, y, reps)
  use1, peak1 = mem()
  ok_sharding = all(y[k].sharding == dst_sh[k] for k in y)
  # A/B on the same machine (after the peak reading): the other bucket schedule, no buckets at all
  # (nothing waited for: the dispatch time is the host time), the other planner modes.
  extra = {}
  other = next(s for s in realloc_mod.SCHEDULES if s != realloc_mod.DEFAULT_SCHEDULE)
  for label, kw in ((other, {"schedule": other}), ("unbucketed", {"bucket_bytes": None})):
    if label == "unbucketed":  # The first call compiles.
      delete(y, keep=x)
      y = reallocate(x, dst_sh, **kw)
      ready(y)
    ts, ds, y = _timed(x, dst_sh, y, reps, **kw)
    extra[f"reallocate_{label}_s"] = statistics.median(ts)
    extra[f"reallocate_{label}_all_s"] = ts
    extra[f"reallocate_{label}_dispatch_s"] = statistics.median(ds)
  delete(y, keep=x)
  extra["host_phases_s"] = host_phases(x, dst_sh, max(reps, 3))
  y = reallocate(x, dst_sh)
  ready(y)
  extra["reallocate_modes_s"], extra["reallocate_modes_all_s"] = {}, {}
  for mode in modes:  # Each checked against the output of the default mode (same shardings).
    if _same_plan(src_sh, dst_sh, shapes, hw, mode):
      continue
    ym = reallocate(x, dst_sh, mode=mode)  # Compiles.
    ready(ym)
    ts, _, ym = _timed(x, dst_sh, ym, reps, mode=mode)
    ok_sharding = ok_sharding and all(ym[k].sharding == dst_sh[k] for k in ym) and bool(_equal(ym, y))
    extra["reallocate_modes_s"][mode] = statistics.median(ts)
    extra["reallocate_modes_all_s"][mode] = ts
    delete(ym, keep=x)
  delete(y, keep=x)
  y = reallocate(x, dst_sh)  # The value check below is on the default path.
  ready(y)
  ok_sharding = ok_sharding and all(y[k].sharding == dst_sh[k] for k in y)
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
  values_equal = bool(_equal(y, d)) and ok_sharding
  delete(d)
  delete(xs)
  delete(y, keep=x)
  delete(x)
  rec = {
      "model": model, "tree": tree, "schedule": realloc_mod.DEFAULT_SCHEDULE, "transition": name,
      "source": str(src_layout), "target": str(dst_layout),
      "leaves": len(shapes), "bytes": nbytes,
      "reallocate_s": statistics.median(r_ts), "reallocate_all_s": r_ts,
      "reallocate_dispatch_s": statistics.median(r_disp), "reallocate_first_call_s": warm_s,
      "device_put_s": d_s,
      "raw_copy_s": statistics.median(c_ts), "raw_copy_all_s": c_ts, **raw,
      **extra,
      "predicted_s": realloc_cost(src_sh, dst_sh, abstract, hw),
      "predicted_unbucketed_s": realloc_cost(src_sh, dst_sh, abstract, hw, bucket_bytes=None),
      "predicted_modes_s": {m: realloc_cost(src_sh, dst_sh, abstract, hw, mode=m) for m in extra["reallocate_modes_s"]},
      **plan_summary(src_sh, dst_sh, shapes, hw),
      "bytes_in_use_before_per_device": use0, "peak_bytes_before_per_device": peak0,
      "peak_bytes_per_device": peak1,
      "values_equal": values_equal,
      "wall_s": time.perf_counter() - t_start,
  }
  rec["raw_copy_ratio"] = rec["raw_copy_s"] / rec["reallocate_s"]
  rec["speedup_vs_device_put"] = rec["device_put_s"] / rec["reallocate_s"]
  rec["predicted_over_measured"] = rec["predicted_s"] / rec["reallocate_s"]
  return rec


IMPLEMENTATION = "cell-classes"  # Results of other implementations (other plans) cannot be refitted here.
HOST_FIT = ("call_s", "dispatch_s")  # The host terms --fit estimates; every other term has its own source.


def _measured(rec):
  """{variant: (mode, bucketed, schedule, measured seconds)} of a record (older files: the default
  schedule was pipelined and the other one was recorded as reallocate_serial_s)."""
  default = rec.get("schedule", "pipelined")
  other = "serial" if default == "pipelined" else "pipelined"
  out = {default: ("auto", True, default, rec["reallocate_s"])}
  if f"reallocate_{other}_s" in rec:
    out[other] = ("auto", True, other, rec[f"reallocate_{other}_s"])
  out["unbucketed"] = ("auto", False, default, rec["reallocate_unbucketed_s"])
  for m, t in rec.get("reallocate_modes_s", {}).items():
    out[m] = (m, True, default, t)
  return out


def _fit_rows(data, hw):
  """Per record: (record, {variant: (bucket loads, schedule, measured)}, host rows [(loads, host seconds)]).
  Host rows: the unbucketed call's time until return (nothing waited for), and the default call's
  when none of its buckets is waited for (same-device reshards only)."""
  bb = data.get("bucket_bytes", DEFAULT_BUCKET_BYTES)
  rows = []
  for rec in data["records"]:
    shapes = param_shapes(rec["model"], rec.get("tree", "per_layer"))
    src_layout, dst_layout = LAYOUTS[rec["transition"]]
    specs = _specs(shardings(shapes, src_layout), shardings(shapes, dst_layout), shapes)
    variants = {}
    for label, (mode, bucketed, schedule, measured) in _measured(rec).items():
      tp = plan_tree(specs, hw, mode, bb if bucketed else None)
      variants[label] = ([b.load for b in tp.buckets], schedule, measured)
    host = [(variants["unbucketed"][0], rec["reallocate_unbucketed_dispatch_s"])]
    auto = plan_tree(specs, hw, "auto", bb)
    if not any(b.holds_intermediates for b in _holds(auto)):
      host.append(([b.load for b in auto.buckets], rec["reallocate_dispatch_s"]))
    rows.append((rec, variants, host))
  return rows


class _Holds:
  def __init__(self, b):
    self.holds_intermediates = any(kd in ("general", "passthrough") for kd in b.kinds.values())


def _holds(tp):
  return [_Holds(b) for b in tp.buckets]


def fit_host(host_rows, hw):
  """call_s and dispatch_s by non-negative least squares on measured host times, the other host
  terms (transfers, arrays) held at `hw`'s values."""
  import dataclasses
  from scipy.optimize import nnls
  a, y = [], []
  for loads, h in host_rows:
    fixed = sum(price(x, dataclasses.replace(hw, dispatch_s=0.0))[0] for x in loads)
    a.append([1.0, sum(x.programs for x in loads)])
    y.append(h - fixed)
  coef, _ = nnls(np.array(a), np.array(y))
  return dataclasses.replace(hw, call_s=float(coef[0]), dispatch_s=float(coef[1]))


def fit(path):
  """Prices every timed variant of a results file with the library's profile (`hardware.DEFAULT`:
  link, HBM and collective terms from their stated sources) after fitting only the host terms
  call_s and dispatch_s to the run's host times; prints predicted/measured per variant in sample
  and leave-one-record-out (the held-out record's host times are not in its fit)."""
  with open(path) as f:
    data = json.load(f)
  if data.get("implementation") != IMPLEMENTATION:
    raise SystemExit(f"{path}: results of implementation {data.get('implementation')!r}, not {IMPLEMENTATION!r}: "
                     f"its plans are not the ones priced here")
  base = hw_mod.DEFAULT
  rows = _fit_rows(data, base)
  hw_all = fit_host([h for *_, host in rows for h in host], base)
  print(f"{path}: {len(rows)} records; profile {base.name} with call_s and dispatch_s fitted to "
        f"{sum(len(h) for *_, h in rows)} host times")
  print(f"in sample: call_s {hw_all.call_s * 1e3:.2f} ms, dispatch_s {hw_all.dispatch_s * 1e6:.0f} us "
        f"(library: {base.call_s * 1e3:.2f} ms, {base.dispatch_s * 1e6:.0f} us)")
  print(f"{'model':5s} {'tree':9s} {'transition':24s} {'variant':10s} {'measured':>9s} {'library':>8s} "
        f"{'in-sample':>9s} {'leave-out':>9s}   (predicted/measured - 1)")
  summary = {}
  for i, (rec, variants, host) in enumerate(rows):
    hw_loo = fit_host([h for j, (*_, hs) in enumerate(rows) if j != i for h in hs], base)
    for label, (loads, schedule, m) in variants.items():
      errs = [tree_seconds(loads, h, schedule) / m - 1 for h in (base, hw_all, hw_loo)]
      summary.setdefault(label, []).append(errs)
      print(f"{rec['model']:5s} {rec.get('tree', 'per_layer'):9s} {rec['transition']:24s} {label:10s} "
            f"{m * 1e3:7.1f}ms {errs[0]:+8.0%} {errs[1]:+9.0%} {errs[2]:+9.0%}")
    for loads, h in host:
      errs = [(h_.call_s + sum(price(x, h_)[0] for x in loads)) / h - 1 for h_ in (base, hw_all, hw_loo)]
      print(f"{'':5s} {'':9s} {'':24s} {'host':10s} {h * 1e3:7.1f}ms {errs[0]:+8.0%} {errs[1]:+9.0%} "
            f"{errs[2]:+9.0%}")
    print(f"{'':41s} leave-out fit: call_s {hw_loo.call_s * 1e3:.2f} ms, dispatch_s {hw_loo.dispatch_s * 1e6:.0f} us")
  for label, errs in summary.items():
    for k, name in enumerate(("library", "in-sample", "leave-out")):
      e = [x[k] for x in errs]
      print(f"{label:10s} {name:9s}: within 25% on {sum(abs(x) <= 0.25 for x in e)} of {len(e)} "
            f"({min(e):+.0%} to {max(e):+.0%})")


def table(path):
  """The README table of a results file (times in ms, device_put in s)."""
  with open(path) as f:
    data = json.load(f)
  print(f"{data['card']}, jax {data['jax']}, {data['date']}, implementation {data.get('implementation')}, "
        f"{len(data['records'])} records, {data.get('total_wall_s', 0):.0f} s")
  print("| model | transition | realloc (dispatch) | serial | unbucketed (host) | modes | raw copy | raw/realloc "
        "| device_put | speedup | predicted |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in data["records"]:
    modes = ", ".join(f"{m} {t * 1e3:.1f}" for m, t in r.get("reallocate_modes_s", {}).items()) or "-"
    serial = f"{r['reallocate_serial_s'] * 1e3:.1f}" if "reallocate_serial_s" in r else "-"
    print(f"| {r['model'].upper()} | {r['transition']} | {r['reallocate_s'] * 1e3:.1f} "
          f"({r.get('reallocate_dispatch_s', 0) * 1e3:.1f}) | {serial} | "
          f"{r['reallocate_unbucketed_s'] * 1e3:.1f} ({r.get('reallocate_unbucketed_dispatch_s', 0) * 1e3:.1f}) | "
          f"{modes} | {r['raw_copy_s'] * 1e3:.1f} | {r['raw_copy_s'] / r['reallocate_s']:.2f} | "
          f"{r['device_put_s']:.2f} | {r['device_put_s'] / r['reallocate_s']:.0f}x | "
          f"{r['predicted_s'] * 1e3:.1f} ({r['predicted_s'] / r['reallocate_s'] - 1:+.0%}) |")


def main():
  t_main = time.perf_counter()
  ap = argparse.ArgumentParser()
  ap.add_argument("--out")
  ap.add_argument("--fit", metavar="JSON", help="refit the Hardware profile to a results file and print it")
  ap.add_argument("--table", metavar="JSON", help="print a results file as the README's markdown table")
  ap.add_argument("--modes", default="pieces,reshard", help="planner modes timed besides auto (comma list, or '')")
  ap.add_argument("--small", action="store_true", help="tiny model on 8 fake CPU devices (a smoke test)")
  ap.add_argument("--models", default=None)
  ap.add_argument("--tree", default="stacked",
                  help="parameter trees, comma list of stacked (real_jax's Transformer, default) and per_layer")
  ap.add_argument("--devices", type=int, default=None, choices=sorted(TRANSITIONS_BY_DEVICES),
                  help="transition set (default 4; 2: the 2-GPU analogues)")
  ap.add_argument("--reps", type=int, default=2)
  ap.add_argument("--budget", type=float, default=360.0, help="start no transition after this many seconds")
  args = ap.parse_args()
  if args.fit:
    return fit(args.fit)
  if args.table:
    return table(args.table)
  if not args.out:
    ap.error("--out is required (or --fit)")
  modes = [m for m in args.modes.split(",") if m]
  trees = [t for t in args.tree.split(",") if t]
  if not trees or set(trees) - set(TREES):
    ap.error(f"--tree: comma list of {TREES}")
  models = args.models.split(",") if args.models else (["tiny"] if args.small else ["7b", "1b"])
  n_dev = args.devices or 4
  if jax.device_count() < n_dev:
    ap.error(f"--devices {n_dev}: only {jax.device_count()} devices")
  transitions = TRANSITIONS_BY_DEVICES[n_dev]
  hw = hw_mod.DEFAULT
  dev = jax.devices()[0]
  out = {"card": dev.device_kind, "platform": dev.platform, "devices": jax.device_count(), "jax": jax.__version__,
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "implementation": IMPLEMENTATION, "reps": args.reps, "bucket_bytes": DEFAULT_BUCKET_BYTES,
         "schedule": realloc_mod.DEFAULT_SCHEDULE, "transition_devices": n_dev, "trees": trees,
         "hardware_default": hw.to_dict(), "complete": False, "records": []}
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
        rec = bench(model, name, s, t, args.reps, hw, modes, tree)
        out["records"].append(rec)
        with open(args.out, "w") as f:
          json.dump(out, f, indent=1)
        print(json.dumps({k: rec.get(k) for k in (
            "tree", "model", "transition", "bytes", "leaves", "reallocate_s", "reallocate_dispatch_s",
            "reallocate_pipelined_s", "reallocate_unbucketed_s", "reallocate_unbucketed_dispatch_s",
            "reallocate_modes_s", "device_put_s", "raw_copy_s", "raw_copy_ratio", "predicted_s", "values_equal",
            "host_phases_s", "wall_s")}), flush=True)
  out["complete"] = len(out["records"]) == len(trees) * len(models) * len(transitions)
  out["total_wall_s"] = time.perf_counter() - t_main
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()

"""Benchmark of `sharding.reallocate` against naive `jax.device_put` and the raw copy bound.

  PYTHONPATH=$PWD python bench/realloc.py --out bench/results/realloc-h100.json      # 4 GPUs
  PYTHONPATH=$PWD python bench/realloc.py --small --out /tmp/realloc-cpu.json        # 8 fake CPUs

For each model (LLaMA-7B- and 1B-shaped bf16 parameter trees, 291 and 201 leaves; --small: tiny
ones with as many leaves as 7B on 8 fake CPU devices) and each transition it measures:

* reallocate_s - `reallocate(tree, targets)` until every output is ready: median of --reps after
                 one warm-up (the warm-up compiles and caches the plan); reallocate_dispatch_s is the
                 time until the call returns (host work), same reps; reallocate_serial_s: the same
                 with the pre-pipelining bucket schedule (`realloc._PIPELINE = False`), and
                 reallocate_unbucketed_s with bucket_bytes=None (after one compiling call);
* device_put_s - naive `jax.device_put(tree, targets)`, timed ONCE (no warm-up: it is the slow
                 host-path baseline, 5-10 s for 7B; nothing in it compiles that a warm-up would hide);
* raw_copy_s   - the raw copy bound: every distinct source shard moved once by one batched
                 `device_put` of single-device shards, each to a target device other than its own
                 (round-robin); median of reps after one warm-up;
* predicted_s  - `realloc_cost` with the default `Hardware` profile (in the library at run time);
* peak_bytes_per_device - `peak_bytes_in_use` per device right after the reallocations (a running
                 max over the process: it cannot be reset), with bytes_in_use before them.

The JSON is rewritten after every record, so a run cut off keeps what it measured; --budget stops
starting new transitions after that many seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

if "--small" in sys.argv:
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from sharding import hardware as hw_mod  # noqa: E402
from sharding.mesh import Layout  # noqa: E402
from sharding._realloc_plan import LeafSpec, plan_tree  # noqa: E402
from sharding import realloc as realloc_mod  # noqa: E402
from sharding.realloc import DEFAULT_BUCKET_BYTES, realloc_cost, reallocate  # noqa: E402
from sharding.rules import PARAM_RULES, spec_for  # noqa: E402

MODELS = {  # vocab, embed D, mlp F, layers L (LLaMA-2 7B: 6.74e9 params; TinyLlama-1.1B-shaped).
    "7b": (32000, 4096, 11008, 32),
    "1b": (32000, 2048, 5632, 22),
    "tiny": (512, 64, 128, 32),
}


def param_shapes(model):
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
  return out


def shardings(shapes, layout):
  rules = PARAM_RULES[layout.rules]
  return {k: NamedSharding(layout.mesh, spec_for(ax, s, layout, rules, what=k)) for k, (s, ax) in shapes.items()}


TRANSITIONS = [  # name, source layout, target layout
    ("fsdp4->tensor4", Layout.on(0, fsdp=4), Layout.on(0, tensor=4)),
    ("fsdp4->tensor2(2 of 4)", Layout.on(0, fsdp=4), Layout.on(0, tensor=2)),
    ("tensor2(2 of 4)->fsdp4", Layout.on(0, tensor=2), Layout.on(0, fsdp=4)),
    ("data2xtensor2->fsdp4", Layout.on(0, data=2, tensor=2), Layout.on(0, fsdp=4)),
]


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


def plan_summary(src_sh, dst_sh, shapes, hw):
  keys = list(shapes)
  specs = tuple(LeafSpec(tuple(shapes[k][0]), "bfloat16", src_sh[k], dst_sh[k]) for k in keys)
  tp = plan_tree(specs, hw, "auto", DEFAULT_BUCKET_BYTES)
  kinds = [kd for b in tp.buckets for kd in b.kinds.values()]
  return {"buckets": len(tp.buckets), "same_device_leaves": kinds.count("same"),
          "general_leaves": kinds.count("general"),
          "reshard_programs": sum(len(b.same) + len(b.reshard) for b in tp.buckets),
          "transfers": sum(len(b.transfers) for b in tp.buckets),
          "predicted_host_s": sum(b.host_s for b in tp.buckets),
          "predicted_device_serial_s": sum(b.device_s for b in tp.buckets),
          "predicted_link_s": sum(b.copy_s for b in tp.buckets),
          "plan_inter": sorted({str(p.inter.spec) + str(p.inter.mesh.axis_sizes) if p.inter else "source"
                                for b in tp.buckets for p in b.leaf_plans.values()})}


def bench(model, name, src_layout, dst_layout, reps, hw):
  shapes = param_shapes(model)
  src_sh, dst_sh = shardings(shapes, src_layout), shardings(shapes, dst_layout)
  nbytes = sum(int(np.prod(s)) * 2 for s, _ in shapes.values())
  abstract = {k: jax.ShapeDtypeStruct(s, jnp.bfloat16) for k, (s, _) in shapes.items()}
  t_start = time.perf_counter()
  x = make_source(shapes, src_sh)
  ready(x)
  use0, peak0 = mem()
  # reallocate: warm-up (compiles, plans) + reps; keep the last output for the value check.
  t0 = time.perf_counter()
  y = reallocate(x, dst_sh)
  ready(y)
  warm_s = time.perf_counter() - t0
  r_ts, r_disp = [], []
  for _ in range(reps):
    delete(y, keep=x)
    t0 = time.perf_counter()
    y = reallocate(x, dst_sh)
    r_disp.append(time.perf_counter() - t0)
    ready(y)
    r_ts.append(time.perf_counter() - t0)
  use1, peak1 = mem()
  ok_sharding = all(y[k].sharding == dst_sh[k] for k in y)
  # A/B on the same machine (after the peak reading): the previous serial bucket schedule, and
  # no buckets at all (everything dispatched, nothing waited for: host vs device time).
  extra = {}
  for label, kw, serial in (("serial", {}, True), ("unbucketed", {"bucket_bytes": None}, False)):
    realloc_mod._PIPELINE = not serial
    try:
      ts = []
      for i in range(reps + (label == "unbucketed")):  # unbucketed: one more (first call compiles).
        delete(y, keep=x)
        t0 = time.perf_counter()
        y = reallocate(x, dst_sh, **kw)
        ready(y)
        ts.append(time.perf_counter() - t0)
      ts = ts[1:] if label == "unbucketed" else ts
      extra[f"reallocate_{label}_s"] = statistics.median(ts)
      extra[f"reallocate_{label}_all_s"] = ts
    finally:
      realloc_mod._PIPELINE = True
  delete(y, keep=x)
  y = reallocate(x, dst_sh)  # The value check below is on the default (pipelined) path.
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
  eq = jax.jit(lambda a, b: jnp.all(jnp.stack([jnp.array_equal(a[k], b[k]) for k in a])))(y, d)
  values_equal = bool(eq) and ok_sharding
  delete(d)
  delete(xs)
  delete(y, keep=x)
  delete(x)
  rec = {
      "model": model, "transition": name, "source": str(src_layout), "target": str(dst_layout),
      "leaves": len(shapes), "bytes": nbytes,
      "reallocate_s": statistics.median(r_ts), "reallocate_all_s": r_ts,
      "reallocate_dispatch_s": statistics.median(r_disp), "reallocate_first_call_s": warm_s,
      "device_put_s": d_s,
      "raw_copy_s": statistics.median(c_ts), "raw_copy_all_s": c_ts, **raw,
      **extra,
      "predicted_s": realloc_cost(src_sh, dst_sh, abstract, hw),
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


def main():
  t_main = time.perf_counter()
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--small", action="store_true", help="tiny model on 8 fake CPU devices (a smoke test)")
  ap.add_argument("--models", default=None)
  ap.add_argument("--reps", type=int, default=2)
  ap.add_argument("--budget", type=float, default=360.0, help="start no transition after this many seconds")
  args = ap.parse_args()
  models = args.models.split(",") if args.models else (["tiny"] if args.small else ["7b", "1b"])
  hw = hw_mod.DEFAULT
  dev = jax.devices()[0]
  out = {"card": dev.device_kind, "platform": dev.platform, "devices": jax.device_count(), "jax": jax.__version__,
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "reps": args.reps, "bucket_bytes": DEFAULT_BUCKET_BYTES, "hardware_default": hw.to_dict(),
         "complete": False, "records": []}
  for model in models:
    for name, s, t in TRANSITIONS:
      if time.perf_counter() - t_main > args.budget:
        print(f"budget: skipping {model} {name}", flush=True)
        continue
      rec = bench(model, name, s, t, args.reps, hw)
      out["records"].append(rec)
      with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
      print(json.dumps({k: rec[k] for k in ("model", "transition", "bytes", "reallocate_s", "reallocate_serial_s",
                                            "reallocate_unbucketed_s", "reallocate_dispatch_s",
                                            "device_put_s", "raw_copy_s", "predicted_s", "values_equal",
                                            "wall_s")}), flush=True)
  out["complete"] = len(out["records"]) == len(models) * len(TRANSITIONS)
  out["total_wall_s"] = time.perf_counter() - t_main
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()

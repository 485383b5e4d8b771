"""Benchmark of `sharding.reallocate` against naive `jax.device_put` and the raw copy bound.

  PYTHONPATH=$PWD python bench/realloc.py --out bench/results/realloc-h100.json      # 4 GPUs
  PYTHONPATH=$PWD python bench/realloc.py --small --out /tmp/realloc-cpu.json        # 8 fake CPUs

For each model (LLaMA-7B- and 1B-shaped bf16 parameter trees; --small: tiny ones) and each
transition it measures, after one warm-up of every path:

* reallocate_s - `reallocate(tree, targets)` until every output is ready (median of reps);
* device_put_s - `jax.device_put(tree, targets)` from a fresh source (it caches a host copy);
* raw_copy_s   - the same bytes (every target shard) moved by one batched `device_put` of
                 single-device shards, each to the next device of the target (a ring);
* predicted_s  - `realloc_cost` with the default `Hardware` profile, and with the profile
                 calibrated from this run (predicted_calibrated_s);
* peak_bytes_per_device - max over devices of `peak_bytes_in_use` after the reallocations (it
                 cannot be reset: a running max), and `extra_bytes_per_device`, the rise of
                 peak over bytes in use before the first reallocation of the transition.
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

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from sharding import hardware as hw_mod  # noqa: E402
from sharding.mesh import Layout  # noqa: E402
from sharding.realloc import plans, realloc_cost, reallocate  # noqa: E402
from sharding.rules import PARAM_RULES, spec_for  # noqa: E402

MODELS = {  # vocab, embed D, mlp F, layers L (LLaMA-2 7B: 6.74e9 params; TinyLlama-1.1B-shaped).
    "7b": (32000, 4096, 11008, 32),
    "1b": (32000, 2048, 5632, 22),
    "tiny": (512, 64, 128, 2),
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
    ("fsdp2@0-1->tensor2@2-3", Layout.on(0, fsdp=2), Layout.on(2, tensor=2)),
]


def make_source(shapes, shs):
  """Parameters filled on device (no host transfer), distinct values per element."""
  out = {}
  for k, (shape, _) in shapes.items():
    def f(shape=shape):
      x = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
      for i in range(1, len(shape)):
        x = x * 7 + jax.lax.broadcasted_iota(jnp.int32, shape, i)
      return (x % 1999).astype(jnp.bfloat16)
    out[k] = jax.jit(f, out_shardings=shs[k])()
  return out


def ready(tree):
  jax.block_until_ready(tree)


def delete(tree):
  for x in jax.tree.leaves(tree):
    x.delete()


def timed(fn, reps):
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = fn()
    ready(out)
    ts.append(time.perf_counter() - t0)
    yield ts, out


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
  return lambda: jax.device_put(xs, ds), sum(v.size * v.dtype.itemsize for v in xs), ds


def bench(model, name, src_layout, dst_layout, reps, hw):
  shapes = param_shapes(model)
  src_sh, dst_sh = shardings(shapes, src_layout), shardings(shapes, dst_layout)
  nbytes = sum(int(np.prod(s)) * 2 for s, _ in shapes.values())
  abstract = {k: jax.ShapeDtypeStruct(s, jnp.bfloat16) for k, (s, _) in shapes.items()}
  x = make_source(shapes, src_sh)
  ready(x)
  use0, peak0 = mem()
  # reallocate: warm-up + reps; keep the last output for the checks and the raw copy.
  y = reallocate(x, dst_sh)
  ready(y)
  delete(y)
  r_ts = []
  for r_ts, y in timed(lambda: reallocate(x, dst_sh), reps):
    if len(r_ts) < reps:
      delete(y)
  use1, peak1 = mem()
  ok_sharding = all(y[k].sharding == dst_sh[k] for k in y)
  # Other plan modes, for the record.
  modes = {}
  for mode in ("reshard", "pieces"):
    delete(reallocate(x, dst_sh, mode=mode))
    m_ts = []
    for m_ts, m in timed(lambda: reallocate(x, dst_sh, mode=mode), reps):
      delete(m)
    modes[mode] = statistics.median(m_ts)
  # Raw copy bound: the array's bytes by plain per-shard device-to-device copies.
  f, raw_bytes, raw_dsts = raw_copy_fn(x, dst_layout)
  delete(f())
  c_ts = []
  for c_ts, c in timed(f, reps):
    delete(c)
  # Naive device_put, from a fresh source each time (it caches a host copy on its input).
  d_ts = []
  for i in range(2):
    xs = make_source(shapes, src_sh)
    ready(xs)
    t0 = time.perf_counter()
    d = jax.device_put(xs, dst_sh)
    ready(d)
    d_ts.append(time.perf_counter() - t0)
    if i == 1:
      eq = jax.jit(lambda a, b: jnp.all(jnp.stack([jnp.array_equal(a[k], b[k]) for k in a])))(y, d)
      values_equal = bool(eq)
    delete(d)
    delete(xs)
  ps = plans(x, dst_sh)
  rec = {
      "model": model, "transition": name, "source": str(src_layout), "target": str(dst_layout),
      "leaves": len(shapes), "bytes": nbytes,
      "reallocate_s": statistics.median(r_ts), "reallocate_all_s": r_ts,
      "device_put_s": d_ts[1], "device_put_all_s": d_ts,
      "raw_copy_s": statistics.median(c_ts), "raw_copy_all_s": c_ts,
      "raw_copy_bytes": raw_bytes, "raw_copy_devices": len(set(raw_dsts)),
      "reshard_mode_s": modes["reshard"], "pieces_mode_s": modes["pieces"],
      "predicted_reshard_mode_s": realloc_cost(src_sh, dst_sh, abstract, hw, mode="reshard"),
      "predicted_pieces_mode_s": realloc_cost(src_sh, dst_sh, abstract, hw, mode="pieces"),
      "plan_stages_s": [sum(p.stages[i] for p in ps) for i in range(4)],
      "plan_inter": sorted({str(p.inter.spec) + str(p.inter.mesh.axis_sizes) if p.inter else "source" for p in ps}),
      "predicted_s": realloc_cost(src_sh, dst_sh, abstract, hw),
      "plan_reshard_bytes_max_device": sum(p.reshard_bytes for p in ps),
      "plan_copy_bytes": sum(p.copy_bytes for p in ps),
      "peak_bytes_per_device": max(peak1),
      "extra_bytes_per_device": max(max(0, p - u) for p, u in zip(peak1, use0)) if max(peak1) > max(peak0) else None,
      "delta_bytes_in_use_per_device": max(b - a for a, b in zip(use0, use1)),
      "values_equal": values_equal and ok_sharding,
  }
  rec["raw_copy_ratio"] = rec["raw_copy_s"] / rec["reallocate_s"]
  rec["speedup_vs_device_put"] = rec["device_put_s"] / rec["reallocate_s"]
  delete(y)
  delete(x)
  return rec, ps


def hbm_bandwidth():
  n = 1 << 28  # 512 MiB of bf16
  x = \
      jax.jit(lambda: jnp.zeros((n,), jnp.bfloat16), out_shardings=jax.sharding.SingleDeviceSharding(jax.devices()[0]))()
  f = jax.jit(lambda a: a + 1)
  ready(f(x))
  ts = []
  for _ in range(5):
    t0 = time.perf_counter()
    ready(f(x))
    ts.append(time.perf_counter() - t0)
  return 2 * n * 2 / min(ts)


def calibrate(records, plans_by_rec, hw):
  """Per-device bandwidths from the measurements: raw copies for d2d, fsdp4->tensor4 for the collective."""
  out = {}
  d2d = [r["raw_copy_bytes"] / r["raw_copy_devices"] / r["raw_copy_s"] for r in records]
  out["d2d_bandwidth"] = statistics.median(d2d)
  coll = [r["plan_reshard_bytes_max_device"] / r["reallocate_s"] for r in records
          if r["transition"].startswith("fsdp4->tensor4") and r["plan_copy_bytes"] == 0]
  if coll:
    out["intra_mesh_collective_bandwidth"] = max(coll)
  return dataclasses.replace(hw, **out)


def _targets(r):
  return [t for n, s, t in TRANSITIONS if n == r["transition"]][0].mesh.devices.flatten().tolist()


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--small", action="store_true", help="tiny model on 8 fake CPU devices (a smoke test)")
  ap.add_argument("--models", default=None)
  ap.add_argument("--reps", type=int, default=3)
  args = ap.parse_args()
  models = args.models.split(",") if args.models else (["tiny"] if args.small else ["1b", "7b"])
  hw = hw_mod.DEFAULT
  records, all_plans = [], []
  for model in models:
    for name, s, t in TRANSITIONS:
      t0 = time.perf_counter()
      rec, ps = bench(model, name, s, t, args.reps, hw)
      records.append(rec)
      all_plans.append(ps)
      print(json.dumps({k: rec[k] for k in ("model", "transition", "bytes", "reallocate_s", "device_put_s",
                                            "raw_copy_s", "predicted_s", "values_equal")}),
            f"({time.perf_counter() - t0:.1f}s)", flush=True)
  cal = calibrate(records, all_plans, hw)
  cal = dataclasses.replace(cal, hbm_bandwidth=hbm_bandwidth(), name=hw.name + "_calibrated")
  for rec in records:
    _, s, t = [tr for tr in TRANSITIONS if tr[0] == rec["transition"]][0]
    shapes = param_shapes(rec["model"])
    abstract = {k: jax.ShapeDtypeStruct(sh, jnp.bfloat16) for k, (sh, _) in shapes.items()}
    rec["predicted_calibrated_s"] = realloc_cost(shardings(shapes, s), shardings(shapes, t), abstract, cal)
  out = {"card": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
         "devices": jax.device_count(), "jax": jax.__version__,
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "hardware_default": hw.to_dict(), "hardware_calibrated": cal.to_dict(), "records": records}
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  print("calibrated:", json.dumps(cal.to_dict()))


if __name__ == "__main__":
  main()

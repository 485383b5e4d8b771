"""Hardware profiles: the measured rates that turn counted flops, bytes and collectives into seconds.

A profile is a JSON file (`search/profiles/*.json`) that is also a valid `sharding.Hardware` (the
reallocation cost model reads the same file). Fields beyond Hardware's:

* `matmul_flops`: achieved dense bf16 (GPU) / f32 (CPU) matmul rate per device, FLOP/s.
* `memory_bytes`: device memory per device that the allocator hands out (`on_local_devices`).
* `memory_reserve`: the share of it plans leave free (default 0.05) for what the simulator does not
  count (batch arrays, a call's outputs while the next runs) and for the allocator's fragmentation: XLA
  asks for a call's temporaries as one buffer (13 GiB for a 7B model's inference), which must find one
  free range. `usable_memory_bytes` is what a plan's peak must fit.
* `call_overhead_s`: fixed cost of dispatching one jitted call (a kind's fitted value overrides it).
* `step_overhead_s`: fixed cost of one decode step per layer (kernel launches; decode is latency bound).
* `host_bandwidth`: host -> device memory, bytes/s per device with every device of the host loading at once
  (frozen models resting in host memory, `ExecutionPlan.offload`; `measure` times it). 20 GB/s where not
  measured.
* `collective_latency_s`: fixed wall-clock cost of one collective inside a host, added per executed
  collective on top of its bytes / bandwidth (outside the fitted `time` / `comm_time` factors). Default
  10 us: on 4x H100 SXM (NVLink, jax 0.11.2) tensor=2 generation of a 1.3B model issued 49k (24.6k)
  all-reduces per call at 1024 (512) new tokens and measured 0.46 s (0.29 s) slower than priced, i.e.
  9-12 us each (bench/README.md, plans, diagnosis 2).
* `inter_host_collective_latency_s`: the same for a collective whose group spans hosts; None (default,
  not measured) = `collective_latency_s`.
* `calibration`: per call kind, multiplicative factors of the analytic estimator tier
  (`flops`, `bytes`, `comm`, `memory`) fitted against compiled estimates (`estimator.fit_calibration`)
  or measured peaks (`memory`, and `memory_tensor` for layouts with tensor > 1: `Estimator.memory_factor`),
  and the time terms fitted against timed runs: `time` (all of the call's seconds), `bytes_time`
  (HBM time's weight), `comm_time` (the exposed share of FSDP gathers and reduce-scatters),
  `reduce_time` (the same for all-reduces: tensor-parallel activations, data-parallel gradients) and
  `call_overhead_s`.
* `calibration_report`: what `--calibrate` timed and how well the estimator matches before and after.

    python -m search.profile --out search/profiles/cpu.json             # micro-benchmarks only
    python -m search.profile --calibrate --out P.json [--base h100_sxm] [--budget 240] [--cases 'C1; C2']
    python -m search.profile --refit P.json --out P2.json               # fit again from P's records
    python -m search.profile --from-bench bench/results/calls-h100.json --base h100_sxm --out P.json

The micro-benchmarks measure matmul rate, HBM (memory copy) bandwidth, device-to-device copy
bandwidth, in-mesh all-gather bandwidth and per-call overhead on the machine at hand (CPU too).
`--calibrate` then times real jitted calls (generation, inference, train step; `search.calibrate`)
and fits the time terms. With `--base`, the base profile's rates are kept (the micro-benchmarks are
recorded in the report only) and calibrated; without it the measured rates are. Estimates for a GPU
cluster planned from a CPU machine take the GPU profile instead (see search/README.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any

from sharding.hardware import Hardware

PROFILE_DIR = os.path.join(os.path.dirname(__file__), "profiles")
# Per-collective wall-clock latency inside a host (module docstring): 4x H100, 1.3B tensor=2 decode.
COLLECTIVE_LATENCY_S = 10e-6


@dataclasses.dataclass(frozen=True)
class Profile:
  name: str
  devices_per_host: int
  matmul_flops: float
  hbm_bandwidth: float
  d2d_bandwidth: float
  inter_host_bandwidth: float
  intra_mesh_collective_bandwidth: float
  memory_bytes: float
  call_overhead_s: float = 50e-6
  step_overhead_s: float = 0.0
  transfer_latency_s: float = 20e-6
  host_bandwidth: float = 20e9
  collective_latency_s: float = COLLECTIVE_LATENCY_S
  inter_host_collective_latency_s: float | None = None
  memory_reserve: float = 0.05
  calibration: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)
  notes: str = dataclasses.field(default="", compare=False)
  calibration_report: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

  @property
  def hardware(self) -> Hardware:
    return Hardware(self.name, self.devices_per_host, self.d2d_bandwidth, self.inter_host_bandwidth,
                    self.hbm_bandwidth, self.intra_mesh_collective_bandwidth, self.transfer_latency_s)

  @property
  def usable_memory_bytes(self) -> float:
    """What a plan's peak per device must fit: `memory_bytes` less the reserve."""
    return self.memory_bytes * (1.0 - self.memory_reserve)

  @property
  def inter_latency_s(self) -> float:
    """Per-collective latency across hosts (`collective_latency_s` unless set)."""
    v = self.inter_host_collective_latency_s
    return self.collective_latency_s if v is None else float(v)

  def factor(self, kind: str, what: str) -> float:
    return float(self.calibration.get(kind, {}).get(what, 1.0))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> Profile:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names - {"extra"}
    if unknown:
      raise ValueError(f"hardware profile has unknown keys {sorted(unknown)}; known: {sorted(names)}")
    return cls(**{k: v for k, v in d.items() if k in names})

  @classmethod
  def load(cls, path: str) -> Profile:
    if not os.path.exists(path) and os.path.exists(os.path.join(PROFILE_DIR, path + ".json")):
      path = os.path.join(PROFILE_DIR, path + ".json")
    with open(path) as f:
      try:
        return cls.from_dict(json.load(f))
      except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"profile {path}: {e}") from None

  def save(self, path: str) -> None:
    with open(path, "w") as f:
      json.dump(self.to_dict(), f, indent=2)
      f.write("\n")

  def replace(self, **kw) -> Profile:
    return dataclasses.replace(self, **kw)

  def on_local_devices(self, devices=None, *, log=None) -> Profile:
    """This profile with `memory_bytes` set to what the local accelerators' allocator allows.

    A plan run on this machine must fit the memory JAX will actually hand out, which is the card's
    memory times XLA_PYTHON_CLIENT_MEM_FRACTION (0.75 unless set), not the memory of the card the
    profile was first measured on (an H200 profile calibrated from an H100 base kept 76 GB). On CPU
    (planning a GPU cluster from a CPU machine) the profile is returned unchanged.
    """
    mem = local_memory_bytes(devices)
    if mem is None or mem == self.memory_bytes:
      return self
    if log:
      log(f"profile {self.name}: memory_bytes {self.memory_bytes / 2**30:.1f} GiB -> {mem / 2**30:.1f} GiB "
          "(this machine's allocator limit)")
    return self.replace(memory_bytes=mem)


def local_memory_bytes(devices=None) -> float | None:
  """The smallest allocator limit (`memory_stats()["bytes_limit"]`) of the local accelerators, or None
  on CPU or where the runtime does not report it."""
  if devices is None:
    import jax
    devices = jax.local_devices()
  limits = []
  for d in devices:
    if d.platform == "cpu":
      return None
    try:
      limits.append(float(d.memory_stats()["bytes_limit"]))
    except (AttributeError, KeyError, TypeError, RuntimeError):
      return None
  return min(limits) if limits else None


def _timeit(fn, *, reps: int = 5) -> float:
  fn()  # warm up / compile
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def measure(name: str | None = None, *, size: int = 0, copy_mb: int = 0) -> Profile:
  """Measures the current machine's rates with small microbenchmarks (seconds on CPU, ~10 s on GPU).

  size: matmul side (default 8192 on GPU, 1024 on CPU); copy_mb: bytes copied (1024 / 64 MiB).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  devs = jax.devices()
  d0 = devs[0]
  kind = d0.platform
  gpu = kind != "cpu"
  size = size or (8192 if gpu else 1024)
  copy_mb = copy_mb or (1024 if gpu else 64)
  rounds = 10 if gpu else 1  # back-to-back calls per timing, so launch latency does not count
  dt = jnp.bfloat16 if gpu else jnp.float32
  a = jax.device_put(jnp.ones((size, size), dt), d0)
  mm = jax.jit(lambda x: x @ x)
  t = _timeit(lambda: [mm(a) for _ in range(rounds)][-1].block_until_ready()) / rounds
  matmul = 2 * size**3 / t
  n = copy_mb * 2**20 // 4
  x = jax.device_put(jnp.ones((n,), jnp.float32), d0)
  cp = jax.jit(lambda v: v + 1)
  hbm = 2 * n * 4 / (_timeit(lambda: [cp(x) for _ in range(rounds)][-1].block_until_ready()) / rounds)
  tiny = jax.device_put(jnp.ones((8,), jnp.float32), d0)
  f = jax.jit(lambda v: v * 2)
  overhead = _timeit(lambda: f(tiny).block_until_ready(), reps=50)
  d2d = coll = hbm
  if len(devs) > 1:
    d2d = n * 4 / _timeit(lambda: jax.device_put(x, devs[1]).block_until_ready())
    from jax.sharding import NamedSharding, PartitionSpec
    mesh = jax.sharding.Mesh(np.array(devs), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    sh = jax.device_put(jnp.ones((n,), jnp.float32), NamedSharding(mesh, PartitionSpec("x")))
    gather = jax.jit(lambda v: v, out_shardings=NamedSharding(mesh, PartitionSpec()))
    coll = n * 4 * (len(devs) - 1) / len(devs) / _timeit(lambda: gather(sh).block_until_ready())
  host = _host_bandwidth(devs, n)
  try:
    mem = float(d0.memory_stats()["bytes_limit"])
  except Exception:  # CPU has no memory_stats: take host memory per device.
    mem = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / len(devs)
  return Profile(name=name or f"{kind}_measured", devices_per_host=jax.local_device_count(), matmul_flops=matmul,
                 hbm_bandwidth=hbm, d2d_bandwidth=d2d, inter_host_bandwidth=d2d, intra_mesh_collective_bandwidth=coll,
                 memory_bytes=mem, call_overhead_s=overhead, transfer_latency_s=overhead,
                 **({"host_bandwidth": host} if host else {}),
                 notes=f"measured by python -m search.profile on {d0.device_kind} x{len(devs)}, jax {jax.__version__}"
                 + ("" if host else f"; {HOST_NOT_MEASURED}"))


HOST_NOT_MEASURED = "host_bandwidth not measured (no pinned_host memory)"


def _host_bandwidth(devs, n: int) -> float | None:
  """Host -> device bytes/s per device with every local device loading at once: what a frozen model resting
  in host memory (`ExecutionPlan.offload`, the engine's `pinned_host` copies) costs before each call.
  n float32 per device. None where the backend has no pinned_host memory."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec
  mesh = jax.sharding.Mesh(np.array(devs), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  on_dev = NamedSharding(mesh, PartitionSpec("x"))
  try:
    on_host = on_dev.with_memory_kind("pinned_host")
    x = jax.jit(lambda: jnp.ones((n * len(devs),), jnp.float32), out_shardings=on_dev)()
    h = jax.device_put(x, on_host).block_until_ready()
  except (ValueError, RuntimeError, NotImplementedError):  # No pinned_host memory on this backend.
    return None
  return n * 4 / _timeit(lambda: jax.device_put(h, on_dev).block_until_ready(), reps=3)


MEASURED = ("matmul_flops", "hbm_bandwidth", "d2d_bandwidth", "intra_mesh_collective_bandwidth", "memory_bytes",
            "call_overhead_s", "host_bandwidth")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m search.profile", description=__doc__.split("\n")[0])
  p.add_argument("--out", default="", help="write the profile JSON here (default: print it)")
  p.add_argument("--name", default=None)
  p.add_argument("--devices", type=int, default=0, help="fake CPU devices (sets XLA_FLAGS before jax starts)")
  p.add_argument("--calibrate", action="store_true", help="time real calls and fit the time terms "
                 "(search/calibrate.py); the profile gets a calibration_report")
  p.add_argument("--base", default="", help="calibrate this profile (path or name under search/profiles/) "
                 "instead of the measured rates")
  p.add_argument("--budget", type=float, default=240.0, help="--calibrate: seconds for micro-benchmarks and timing "
                 "(no case starts once the budget is spent)")
  p.add_argument("--reps", type=int, default=3, help="--calibrate: timed runs per call (median)")
  p.add_argument("--models", default="", help="--calibrate: comma-separated shape names (default: 350m,1.3b on "
                 "GPU, tiny,tiny2 on CPU)")
  p.add_argument("--kinds", default="", help="--calibrate: comma-separated call kinds to time (default: generate,"
                 "inference,train_step)")
  p.add_argument("--cases", default="", help="--calibrate: ';'-separated cases, timed in this order instead of the "
                 "default ones (--models / --kinds), e.g. '1.3b generate 0:2/d2f1t1 b128p128n512; 350m values "
                 "0:2/d2f1t1 b128s640; 1.3b train 0:2/d1f2t1 b32s640 remat=full' (search.calibrate.Case.parse)")
  p.add_argument("--refit", default="", help="fit again from the records of this calibrated profile (no timing)")
  p.add_argument("--add-records", default="", help="--refit: a JSON file of more records ({'records': [...]}, e.g. "
                 "bench/plans.py --call-records) kept in the profile's report and fitted with the others")
  p.add_argument("--drop-kinds", default="", help="--refit: comma-separated call kinds whose records leave the "
                 "fit first (the code they timed changed), e.g. train_step with --add-records of it timed again")
  p.add_argument("--from-bench", default="", help="fit --base to the timed calls of a bench/results/calls-<card>.json "
                 "(no timing)")
  args = p.parse_args(argv)
  if args.devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}").strip()
  if (args.add_records or args.drop_kinds) and not args.refit:
    raise SystemExit("--add-records and --drop-kinds go with --refit (the profile whose records they change)")
  if args.refit or args.from_bench:
    from search import calibrate as cal
    if args.refit:
      add = []
      if args.add_records:
        with open(args.add_records) as f:
          add = json.load(f)["records"]
      drop = [k.strip() for k in args.drop_kinds.split(",") if k.strip()]
      prof = cal.refit(args.refit, Profile.load(args.base) if args.base else None, add, drop)
    else:
      if not args.base:
        raise SystemExit("--from-bench needs --base (the profile the bench machine's calls are fitted to)")
      base = Profile.load(args.base)
      prof, rep = cal.report(base, cal.bench_records(args.from_bench))
      prof = prof.replace(notes=f"{base.notes} | time terms fitted to the timed calls of {args.from_bench} "
                          "(see calibration_report)", calibration_report={
          "method": "search/calibrate.py (module docstring); errors: predicted / measured - 1",
          "source": args.from_bench, "base": base.name, "base_profile": base.replace(calibration_report={}).to_dict(),
          "status": "fitted"} | rep)
    if args.name:
      prof = prof.replace(name=args.name)
    _emit(prof, args.out, quiet=True)
    print("\n".join(cal.summary_lines(prof)))
    return
  t0 = time.perf_counter()
  measured = measure(args.name)
  prof = measured
  if args.base:
    # The base's rates are kept (module docstring), but not its memory: that is this machine's card.
    prof = Profile.load(args.base).on_local_devices(log=print)
    if args.name:
      prof = prof.replace(name=args.name)
  if args.calibrate:
    import jax

    from search import calibrate as cal
    from search.plan import layout_from_text
    split = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
    if args.cases:
      cases = [cal.Case.parse(c) for c in args.cases.split(";") if c.strip()]
      for c in cases:
        dm = layout_from_text(c.layout).device_mesh
        if dm.stop > jax.device_count():
          raise SystemExit(f"--cases {c.name!r}: needs devices {dm.start}..{dm.stop - 1}, this machine has "
                           f"{jax.device_count()}")
    else:
      cases = cal.default_cases(jax.devices()[0].platform, jax.device_count(), split(args.models),
                                split(args.kinds) or cal.KINDS)
    micro = {k: getattr(measured, k) for k in MEASURED
             if k != "host_bandwidth" or HOST_NOT_MEASURED not in measured.notes}
    prof = cal.calibrate(prof, out=args.out, budget_s=args.budget - (time.perf_counter() - t0), reps=args.reps,
                         cases=cases, micro=micro)
    _emit(prof, args.out, quiet=True)
    print("\n".join(cal.summary_lines(prof)))
    return
  _emit(prof, args.out)


def _emit(prof: Profile, out: str, *, quiet: bool = False) -> None:
  if out:
    prof.save(out)
    print(f"wrote {out}")
  if not quiet:
    d = prof.to_dict()
    d.pop("calibration_report", None)
    print(json.dumps(d, indent=2))


if __name__ == "__main__":
  main()

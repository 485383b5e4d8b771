"""sharding.reallocate on 8 fake CPU devices: values bitwise equal, target shardings, no host transfer.

Reference values are numpy arrays made on the host side before anything is placed; sources are
placed with device_put *outside* the transfer guard and never read back before reallocating.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

from sharding import Hardware, Layout, realloc_cost, reallocate
from sharding.hardware import H100_SXM
from sharding.realloc import plans

DTYPES = [np.float32, jnp.bfloat16, np.int32, np.bool_]


def _value(shape, dtype, seed):
  rng = np.random.default_rng(seed)
  x = rng.integers(-1000, 1000, size=shape)
  return (x % 2).astype(np.bool_) if dtype == np.bool_ else np.asarray(x).astype(dtype)


def _check(y, ref, target):
  assert y.sharding == target, (y.sharding, target)
  assert y.dtype == ref.dtype and y.shape == ref.shape
  for sh in y.addressable_shards:
    got = np.asarray(sh.data)
    want = np.ascontiguousarray(ref[sh.index])
    np.testing.assert_array_equal(got.reshape(-1).view(np.uint8), want.reshape(-1).view(np.uint8))


def _move(refs, src, dst, **kw):
  xs = jax.tree.map(lambda r, s: jax.device_put(r, s), refs, src)
  with jax.transfer_guard("disallow"):
    ys = reallocate(xs, dst, **kw)
    jax.block_until_ready(ys)
  if isinstance(dst, NamedSharding):
    dst = jax.tree.map(lambda _: dst, refs)
  jax.tree.map(_check, ys, refs, dst)
  return xs, ys


# Bytes decide the plan, as they do for the gigabyte leaves of real models (tiny test arrays would
# otherwise be decided by per-call host terms).
BYTES_ONLY = Hardware("bytes_only", 8, 389e9, 45e9, 2.6e12, 389e9, 0.0, dispatch_s=0.0, collective_latency_s=0.0,
                      leaf_arg_s=0.0, leaf_assemble_s=0.0)


def _programs_of(xs, dst, mode="auto", hardware=None, **kw):
  """The bucket programs `reallocate(xs, dst, mode=mode, **kw)` runs (and their schedule): the same
  cache lookup it makes."""
  from sharding import realloc as R
  leaves, _, targets = R._targets_like(xs, dst)
  opts = {"bucket_bytes": R.DEFAULT_BUCKET_BYTES, "schedule": R.DEFAULT_SCHEDULE, "direct": R.DEFAULT_DIRECT, **kw}
  return R._cached_programs(leaves, targets, hardware or R._hw.local_default(), mode, opts["bucket_bytes"], opts["schedule"],
                            opts["direct"])


L = Layout.on
CASES = {  # name: (source sharding, target sharding), for a (16, 8) array
    "same devices, other spec": (L(0, fsdp=4).named("fsdp"), L(0, tensor=4).named(None, "tensor")),
    "overlapping sets": (L(0, fsdp=4).named("fsdp"), L(2, fsdp=2, tensor=2).named("tensor", "fsdp")),
    "disjoint sets": (L(0, fsdp=4).named("fsdp"), L(4, tensor=4).named(None, "tensor")),
    "4 -> 2": (L(0, fsdp=4).named("fsdp"), L(0, tensor=2).named(None, "tensor")),
    "2 -> 8": (L(0, tensor=2).named(None, "tensor"), L(0, fsdp=8).named("fsdp")),
    "8 -> 1": (L(0, fsdp=8).named("fsdp"), L(5).named()),
    "1 -> 8": (L(3).named(), L(0, fsdp=4, tensor=2).named("fsdp", "tensor")),
    "axis order": (L(0, fsdp=2, tensor=4).named(("fsdp", "tensor")), L(0, fsdp=2, tensor=4).named(("tensor", "fsdp"))),
    "replicated -> sharded": (L(0, data=4).named(), L(4, fsdp=4).named(None, "fsdp")),
    "sharded -> replicated": (L(0, fsdp=8).named(None, "fsdp"), L(0, data=2, tensor=2).named()),
    "data x tensor -> fsdp": (L(0, data=2, tensor=2).named(None, "tensor"), L(0, fsdp=4).named("fsdp")),
    "identical": (L(0, fsdp=4).named("fsdp"), L(0, fsdp=4).named("fsdp")),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("mode", ["auto", "reshard", "pieces"])
def test_cases(name, mode):
  src, dst = CASES[name]
  refs = {"a": _value((16, 8), np.float32, 0), "b": _value((16, 8), jnp.bfloat16, 1)}
  _move(refs, {"a": src, "b": src}, {"a": dst, "b": dst}, mode=mode, bucket_bytes=600)


def test_mixed_dtypes_scalars_empty_subtrees_uneven():
  src, dst = L(0, fsdp=4), L(2, data=2, tensor=2)
  refs = {"w": _value((12, 6), jnp.bfloat16, 0),   # 12 / 4 and 6 / 2 even; 3 rows per fsdp shard
          "odd": _value((8, 7), np.int32, 1),      # 7 is never sharded
          "mask": _value((4, 16), np.bool_, 2), "step": np.int32(7), "scale": np.float32(0.5),
          "empty": {}, "none": [], "zero": np.zeros((0, 4), np.float32)}
  src_sh = {"w": src.named("fsdp"), "odd": src.named("fsdp"), "mask": src.named(None, "fsdp"),
            "step": src.named(), "scale": src.named(), "empty": {}, "none": [], "zero": src.named(None, "fsdp")}
  dst_sh = {"w": dst.named(None, "tensor"), "odd": dst.named("tensor"), "mask": dst.named("tensor"),
            "step": dst.named(), "scale": dst.named(), "empty": {}, "none": [], "zero": dst.named(None, "tensor")}
  _, ys = _move(refs, src_sh, dst_sh)
  assert ys["empty"] == {} and ys["none"] == []


def test_cells_refine_pieces_that_differ_between_target_devices():
  """3 -> 2 devices: target shards of 3 rows built from source shards of 2 rows are cut at different
  offsets on the two target devices ({0, 2, 3} and {0, 1, 3}); the shared cell grid {0, 1, 2, 3}
  keeps one unpack program for both, and the values are exact."""
  from sharding.mesh import mesh_over_devices
  devs = jax.devices()
  src = NamedSharding(mesh_over_devices(devs[:3], (1, 3, 1)), P("fsdp"))
  dst = NamedSharding(mesh_over_devices(devs[5:7], (1, 2, 1)), P("fsdp"))
  refs = {"a": _value((6, 4), np.float32, 0), "b": _value((6,), np.int32, 1)}
  xs, _ = _move(refs, {"a": src, "b": src}, {"a": dst, "b": dst}, mode="pieces")
  (prog,), _ = _programs_of(xs, dst, "pieces")
  assert [lc.grid for lc in prog.bp.cells.values()] == [(3, 1), (3,)] and len(prog.unpacks) == 1


def test_single_target_for_all_leaves():
  refs = [_value((8, 8), np.float32, i) for i in range(3)]
  src = [L(0, fsdp=4).named("fsdp")] * 3
  _move(refs, src, L(4, tensor=4).named(None, "tensor"))


@pytest.mark.parametrize("name", ["disjoint sets", "same devices, other spec", "8 -> 1"])
def test_donate_frees_source(name):
  src, dst = CASES[name]
  x = jax.device_put(_value((16, 8), np.float32, 0), src)
  with jax.transfer_guard("disallow"):
    y = reallocate(x, dst, donate=True)
    jax.block_until_ready(y)
  assert x.is_deleted()
  assert not y.is_deleted()


def test_naive_device_put_would_go_through_host():
  """The guard is armed: the path reallocate avoids raises under it."""
  src, dst = CASES["same devices, other spec"]
  x = jax.device_put(_value((16, 8), np.float32, 0), src)
  with jax.transfer_guard("disallow"), pytest.raises(Exception, match="Disallowed"):
    jax.block_until_ready(jax.device_put(x, dst))


def test_bucketing_keeps_order_and_values():
  refs = [_value((8, 4), np.int32, i) for i in range(9)]
  _move(refs, [L(0, fsdp=2).named("fsdp")] * 9, [L(2, tensor=4).named(None, "tensor")] * 9, bucket_bytes=100)


def test_realloc_cost():
  shapes = {"w": jax.ShapeDtypeStruct((16384, 4096), jnp.bfloat16)}
  same = realloc_cost(L(0, fsdp=4).named("fsdp"), L(0, fsdp=4).named("fsdp"), shapes, H100_SXM)
  assert same == 0.0
  a2a = realloc_cost(L(0, fsdp=4).named("fsdp"), L(0, tensor=4).named(None, "tensor"), shapes, H100_SXM)
  far = realloc_cost(L(0, fsdp=4).named("fsdp"), L(4, tensor=4).named(None, "tensor"), shapes, H100_SXM)
  assert 0 < a2a and 0 < far
  # Without the call's fixed host time (7.5 ms on H100_SXM, which would hide the link term here).
  fast = Hardware.from_dict({**H100_SXM.to_dict(), "call_s": 0.0})
  far = realloc_cost(L(0, fsdp=4).named("fsdp"), L(4, tensor=4).named(None, "tensor"), shapes, fast)
  slow = Hardware.from_dict({**fast.to_dict(), "d2d_bandwidth": 1e9, "intra_mesh_collective_bandwidth": 1e9})
  nbytes = 16384 * 4096 * 2
  slow_far = realloc_cost(L(0, fsdp=4).named("fsdp"), L(4, tensor=4).named(None, "tensor"), shapes, slow)
  # Disjoint 4 -> 4: each target device receives a quarter of the array, over at most 4 device pairs.
  assert slow_far > 2 * far and slow_far >= nbytes / 4 / 4 / 1e9
  assert far >= nbytes / 4 / H100_SXM.d2d_device_bandwidth
  # Host time per array is priced: 100 small leaves cost more than one leaf of their bytes, by at
  # least their extra program arguments (again without the fixed time per call).
  many = {f"w{i}": jax.ShapeDtypeStruct((64, 64), jnp.bfloat16) for i in range(100)}
  one = {"w": jax.ShapeDtypeStruct((640, 640), jnp.bfloat16)}
  src, dst = L(0, tensor=2).named(None, "tensor"), L(0, fsdp=4).named("fsdp")
  assert realloc_cost(src, dst, many, fast) > realloc_cost(src, dst, one, fast) + 99 * fast.leaf_arg_s
  # The call's fixed host time is priced once per call, whatever its plan.
  assert realloc_cost(src, dst, one, H100_SXM) - realloc_cost(src, dst, one, fast) == pytest.approx(H100_SXM.call_s)


def test_cost_is_a_function_of_the_plan_loads():
  """realloc_cost prices the executed plan from hardware-free loads: repricing them with the planning
  profile gives the same seconds, and slower links or more host cost per array give more."""
  from sharding._realloc_plan import LeafSpec, plan_tree, tree_seconds
  src, dst = L(0, tensor=2).named(None, "tensor"), L(0, fsdp=4).named("fsdp")
  base = Hardware.from_dict({**H100_SXM.to_dict(), "call_s": 0.0})  # the fixed time per call would dominate
  specs = tuple(LeafSpec((64, 32), "bfloat16", src, dst) for _ in range(20))
  tp = plan_tree(specs, base, "auto", 4 * 64 * 32 * 2)
  loads = [b.load for b in tp.buckets]
  assert len(loads) == 5 and tree_seconds(loads, base) == pytest.approx(tp.seconds)
  assert all(x.transfers and x.assembled_arrays == len(b.classes) for x, b in zip(loads, tp.buckets))
  slow = Hardware.from_dict({**base.to_dict(), "d2d_bandwidth": 1e5, "d2d_device_bandwidth": 1e5})
  busy = Hardware.from_dict({**base.to_dict(), "leaf_arg_s": 1e-3})
  assert tree_seconds(loads, slow) > 10 * tp.seconds and tree_seconds(loads, busy) > 10 * tp.seconds


def test_hardware_json_roundtrip_keeps_unknown_keys():
  d = {**H100_SXM.to_dict(), "matmul_flops": 9.9e14}
  hw = Hardware.from_json(Hardware.from_dict(d).to_json())
  assert hw == H100_SXM  # `extra` is not compared; checked on its own below.
  assert hw.extra["matmul_flops"] == 9.9e14
  with pytest.raises(ValueError, match="lacks"):
    Hardware.from_dict({"name": "x"})


# ---- property test over random pytrees, meshes and specs --------------------------------------

def _layouts():
  out = []
  for size in (1, 2, 4, 8):
    for start in range(0, 8, size):
      for d in (1, 2, 4, 8):
        for t in (1, 2, 4, 8):
          if size % (d * t) == 0:
            out.append(L(start, data=d, fsdp=size // (d * t), tensor=t))
  return out


LAYOUTS = _layouts()
AXES_CHOICES = [None, "data", "fsdp", "tensor", ("fsdp", "tensor"), ("tensor", "fsdp"), ("data", "fsdp")]


@st.composite
def _sharding(draw, shape):
  layout = draw(st.sampled_from(LAYOUTS))
  spec, used = [], set()
  for n in shape:
    ax = draw(st.sampled_from(AXES_CHOICES))
    names = () if ax is None else ((ax,) if isinstance(ax, str) else ax)
    size = math.prod(getattr(layout.strategy, a) for a in names)
    if used & set(names) or n % size:
      ax = None
    else:
      used |= set(names)
    spec.append(ax)
  return NamedSharding(layout.mesh, P(*spec))


@st.composite
def _case(draw):
  n = draw(st.integers(1, 3))
  refs, src, dst = {}, {}, {}
  for i in range(n):
    shape = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 4, 8, 16]), min_size=0, max_size=3)))
    dtype = draw(st.sampled_from(DTYPES))
    refs[f"p{i}"] = _value(shape, dtype, i)
    src[f"p{i}"] = draw(_sharding(shape))
    dst[f"p{i}"] = draw(_sharding(shape))
  kw = {"mode": draw(st.sampled_from(["auto", "reshard", "pieces"])), "direct": draw(st.booleans()),
        "schedule": draw(st.sampled_from(["auto", "serial", "pipelined"])),
        "hardware": draw(st.sampled_from([None, BYTES_ONLY]))}
  return refs, src, dst, kw


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(_case())
def test_property_random_trees(case):
  """Random trees, meshes, specs, planner modes, schedules, direct or packed cells, and profiles (the
  default's host terms or bytes alone decide the plans)."""
  refs, src, dst, kw = case
  _move(refs, src, dst, **kw)


def test_batched_programs_and_cached_plans(monkeypatch):
  """One reshard program per bucket on a shared device list; otherwise one pack program per source
  device, one unpack program per target mesh whose outputs are the target arrays, and Python-made
  arrays only per cell class (4 here: two cells per target shard, two dtypes), not per leaf; a
  repeated reallocation finds its programs by one lookup, plans nothing and builds its class arrays
  without the public API's per-call checks."""
  from sharding import realloc as R
  refs = {f"w{i}": _value((16, 8), np.float32, i) for i in range(12)}
  refs["m"] = _value((8, 8), jnp.bfloat16, 99)
  src = L(0, fsdp=4).named("fsdp")
  made = []
  make = jax.make_array_from_single_device_arrays
  monkeypatch.setattr(jax, "make_array_from_single_device_arrays", lambda *a, **k: (made.append(a[1]), make(*a, **k))[1])
  for dst, same in ((L(0, tensor=4).named(None, "tensor"), True), (L(2, fsdp=2, tensor=2).named("tensor", "fsdp"), False)):
    made.clear()
    xs, _ = _move(refs, jax.tree.map(lambda _: src, refs), jax.tree.map(lambda _: dst, refs))
    leaves = jax.tree.leaves(xs)
    (prog,), _ = _programs_of(xs, dst)
    if same:
      assert [len(ks) for ks, _ in prog.same] == [len(leaves)] and not prog.puts and not made
    else:
      assert not prog.same and set(prog.bp.kinds.values()) == {"general"}
      assert len(prog.bp.classes) == 4 and len(prog.arrays) == 4 and len(made) == 4
      assert len(prog.packs) == 4 and len(prog.unpacks) == 1 and len(prog.unpacks[0][1]) == len(leaves)
      assert len(prog.puts) == len(prog.bp.transfers) <= 4 * 4
    before = R._programs.cache_info()
    made.clear()
    with jax.transfer_guard("disallow"):
      jax.block_until_ready(reallocate(xs, dst))
    # The class arrays of a repeated call skip the public API's checks (built once, checked then).
    assert R._programs.cache_info() == before and len(made) == 0
    assert all(make.fast for *_, make in prog.arrays) and len(prog.arrays) == (0 if same else 4)


@pytest.mark.parametrize("schedule", ["pipelined", "serial", None])
def test_bucket_schedules(monkeypatch, schedule):
  """2 -> 4 devices (tensor2 -> fsdp4, the few-sources case) in many small buckets. "pipelined":
  bucket b's packs and transfers are dispatched before bucket b-1's unpacks; "serial": each bucket is
  sent and received before the next; the default ("auto", None here) runs the one its plan priced
  faster. Values, shardings, donation and the transfer guard hold either way."""
  from sharding import realloc as R
  calls = []
  send, recv = R._BucketProgram.send, R._BucketProgram.recv
  monkeypatch.setattr(R._BucketProgram, "send", lambda self, *a: (calls.append(("send", id(self))), send(self, *a))[1])
  monkeypatch.setattr(R._BucketProgram, "recv", lambda self, *a: (calls.append(("recv", id(self))), recv(self, *a))[1])
  src, dst = L(0, tensor=2).named(None, "tensor"), L(0, fsdp=4).named("fsdp")
  refs = {f"w{i}": _value((16, 8), np.float32, i) for i in range(6)}
  kw = {} if schedule is None else {"schedule": schedule}
  bb = 2 * 16 * 8 * 4
  xs, _ = _move(refs, {k: src for k in refs}, dst, bucket_bytes=bb, donate=True, **kw)
  assert all(x.is_deleted() for x in xs.values())
  progs = [p for kind, p in calls if kind == "send"]
  assert len(progs) == 3
  ran = schedule or _programs_of(xs, dst, bucket_bytes=bb)[1]
  assert R.DEFAULT_SCHEDULE == "auto" and ran in ("serial", "pipelined")
  if ran == "pipelined":
    assert [k for k, _ in calls] == ["send", "send", "recv", "send", "recv", "recv"]
  else:
    assert [k for k, _ in calls] == ["send", "recv"] * 3
  assert [p for k, p in calls if k == "recv"] == progs
  with pytest.raises(ValueError, match="schedule"):
    reallocate(xs, dst, schedule="eager")


def test_schedule_prices():
  """realloc_cost simulates the schedule it is given: tensor2 -> fsdp4 in three buckets, slow links and
  HBM. Pipelined beats serial (bucket b+1's copies overlap bucket b's unpack on the devices that
  receive), neither beats the links alone, both pay the call's fixed host time, and "auto" picks the
  faster one; realloc_cost follows its schedule argument."""
  import dataclasses
  from sharding._realloc_plan import LeafSpec, plan_tree, tree_seconds
  src, dst = L(0, tensor=2).named(None, "tensor"), L(0, fsdp=4).named("fsdp")
  slow = dataclasses.replace(H100_SXM, d2d_bandwidth=1e6, d2d_device_bandwidth=1e6, hbm_bandwidth=1e7, call_s=0.0)
  specs = tuple(LeafSpec((256, 64), "float32", src, dst) for _ in range(6))
  bb = 2 * 256 * 64 * 4
  tp = plan_tree(specs, slow, "auto", bb)
  loads = [b.load for b in tp.buckets]
  links = sum(b.copy_s for b in tp.buckets)
  assert len(loads) == 3 and all(b.copy_s > 0 for b in tp.buckets)
  serial, pipelined = tree_seconds(loads, slow, "serial"), tree_seconds(loads, slow, "pipelined")
  assert tp.seconds == serial and tp.schedule == "serial"
  assert links < pipelined < serial <= sum(b.device_s for b in tp.buckets) + sum(b.host_s for b in tp.buckets)
  auto = plan_tree(specs, slow, "auto", bb, "auto")
  assert auto.schedule == "pipelined" and auto.seconds == pytest.approx(pipelined)
  shapes = [jax.ShapeDtypeStruct((256, 64), jnp.float32)] * 6
  assert realloc_cost(src, dst, shapes, slow, bucket_bytes=bb, schedule="pipelined") == pytest.approx(pipelined)
  assert realloc_cost(src, dst, shapes, slow, bucket_bytes=bb, schedule="serial") == pytest.approx(serial)
  for hw in (H100_SXM, dataclasses.replace(H100_SXM, call_s=0.5)):
    assert tree_seconds(loads, hw, "serial") >= hw.call_s
  with pytest.raises(ValueError, match="schedule"):
    tree_seconds(loads, slow, "eager")


def test_timeline_by_hand():
  """Two buckets, each packed on device 0 (1 s), copied to device 1 (2 s), unpacked there (1 s), no host
  cost. Serial: bucket 1's copy waits for bucket 0's unpack (a copy's destination buffer is allocated
  in its device's compute-stream order): 1 + 2 + 1 + 2 + 1 = 7 s. Pipelined: bucket 1's copy is
  dispatched before bucket 0's unpack and follows bucket 0's copy on the link: 1 + 2 + 2 + 1 = 6 s."""
  from sharding._realloc_cost import BucketLoad, timeline
  d0, d1 = jax.devices()[:2]
  free = Hardware("t", 8, 1.0, 1.0, 2.0, 1.0, 0.0, 1.0, dispatch_s=0.0, collective_latency_s=0.0, leaf_arg_s=0.0,
                  leaf_assemble_s=0.0)
  load = BucketLoad(collective_bytes=0, collectives=0, packed={d0: 1}, pairs={(d0, d1): 2}, built={d1: 1},
                    programs=2, transfers=1, assembled_arrays=1, program_arrays=4, pack_programs=1,
                    holds_intermediates=True)
  assert timeline([load, load], free, "serial") == (0.0, 7.0)
  assert timeline([load, load], free, "pipelined") == (0.0, 6.0)
  # Three buckets, a bucket bound: the host waits for bucket 0 (done at 4 s) before sending bucket 2.
  assert timeline([load] * 3, free, "serial")[0] == 4.0
  assert timeline([load] * 3, free, "serial", waits=False)[0] == 0.0


def test_reshard_prices_xla_layout_copies():
  """XLA:GPU runs all-gathers and all-to-alls along the most major dimension: a collective whose dimension
  has an extent > 1 before it copies its operand and / or result once more; a local slice reads and
  writes the target shard; a major-dimension gather copies nothing."""
  from sharding._realloc_plan import regions, reshard_bytes
  two = L(0, fsdp=2)
  def cost(shape, src, dst):
    return reshard_bytes(shape, 2, regions(src, shape), regions(dst, shape))
  n = 8 * 16 * 6  # elements
  assert cost((8, 16, 6), two.named("fsdp"), two.named()) == (n // 2 * 2, 0)  # major gather: straight
  assert cost((8, 16, 6), two.named(None, "fsdp"), two.named()) == (n, 2 * (n + 2 * n))  # in and out copied
  # all-to-all of a 2D leaf: split dim 1 (operand copied), gathered dim 0 is major (result written straight).
  assert cost((8, 16), two.named("fsdp"), two.named(None, "fsdp")) == (8 * 16 // 4 * 2, 2 * (8 * 16))
  assert cost((8, 16), two.named(), two.named(None, "fsdp")) == (0, 8 * 16 * 2)  # slice: read + write


def test_cost_terms_monotone_in_bytes_and_arrays():
  """More bytes (bigger leaves), more arrays (more leaves of the same total bytes), a larger fixed
  host time, slower HBM (the pack and unpack passes) or slower links never make a reallocation cheaper."""
  import dataclasses
  src, dst = L(0, tensor=2).named(None, "tensor"), L(0, fsdp=4).named("fsdp")
  def cost(n_leaves, rows, hw=H100_SXM, **kw):
    return realloc_cost(src, dst, [jax.ShapeDtypeStruct((rows, 4096), jnp.bfloat16)] * n_leaves, hw, **kw)
  by_bytes = [cost(4, r) for r in (64, 1024, 16384, 65536)]
  assert by_bytes == sorted(by_bytes) and by_bytes[-1] > by_bytes[0]
  by_arrays = [cost(n, 65536 // n) for n in (1, 8, 64, 256)]  # same bytes, more arrays
  assert by_arrays == sorted(by_arrays) and by_arrays[-1] > by_arrays[0]
  for field, value in (("call_s", 1.0), ("hbm_bandwidth", 1e9), ("d2d_device_bandwidth", 1e9),
                       ("leaf_arg_s", 1e-3), ("dispatch_s", 1e-2)):
    worse = dataclasses.replace(H100_SXM, **{field: value})
    for sched in ("serial", "pipelined"):
      assert cost(8, 8192, worse, schedule=sched) > cost(8, 8192, schedule=sched), (field, sched)


def test_only_buckets_with_intermediates_wait(monkeypatch):
  """Buckets of same-device reshards hold no intermediates and are never waited for; buckets that
  pack and copy wait for the one two before them (at most two in flight)."""
  from sharding import realloc as R
  waits = []
  monkeypatch.setattr(R, "_wait", lambda x: waits.append(x) or jax.block_until_ready(x))
  refs = {f"w{i}": _value((16, 8), np.float32, i) for i in range(6)}
  src = {k: L(0, fsdp=4).named("fsdp") for k in refs}
  _move(refs, src, L(0, tensor=4).named(None, "tensor"), bucket_bytes=16 * 8 * 4)
  assert waits == []
  _move(refs, src, L(4, tensor=4).named(None, "tensor"), bucket_bytes=16 * 8 * 4)
  assert len(waits) == 6 - 2


# ---- targets inside the source mesh ("gather" transitions) ----------------------------------------

def test_gather_into_one_source_device():
  """fsdp2 -> device 1 alone (a device of the source mesh). A leaf sharded along its major dimension is
  all-gathered in the source mesh (NCCL writes the result straight) and device 1 keeps its own buffer
  of it: a pass-through, nothing packed or copied. A leaf sharded along a minor dimension (XLA would
  copy it into and out of a gather layout) moves device 0's shard as it is (a direct class: no pack)
  and device 1's unpack concatenates it with its own shard, read in place. Values bitwise, target
  shardings, no host transfer (`_move`), and donation frees the sources."""
  src2, one = L(0, fsdp=2), L(1).named()
  refs = {"major": _value((8, 6), np.float32, 0), "minor": _value((4, 8, 6), np.float32, 1),
          "minor16": _value((2, 8, 4), jnp.bfloat16, 2)}
  src = {"major": src2.named("fsdp"), "minor": src2.named(None, "fsdp"), "minor16": src2.named(None, "fsdp")}
  xs, _ = _move(refs, src, one, hardware=BYTES_ONLY, donate=True, schedule="serial", direct=True)
  assert all(x.is_deleted() for x in xs.values())
  (prog,), _ = _programs_of(xs, one, hardware=BYTES_ONLY, schedule="serial", direct=True)
  bp = prog.bp
  assert [bp.kinds[k] for k in range(3)] == ["passthrough", "general", "general"]
  inter = bp.leaf_plans[0].inter
  assert inter.is_fully_replicated and list(inter.mesh.devices.flat) == list(src2.mesh.devices.flat)
  assert all(cl.shape is not None for cl in bp.classes) and not prog.packs and len(prog.direct) == 4
  assert len(bp.transfers) == 2 and all(cl.srcs == (jax.devices()[0],) for cl in bp.classes[::2])
  # The same move with every cell packed (the default) gives the same values.
  _move(refs, src, one, hardware=BYTES_ONLY)


def test_partial_gather_keeps_target_shards():
  """fsdp2 x tensor2 on devices 0-3 -> tensor2 on devices 0-1: an all-gather over fsdp only (an
  intermediate replicated over pairs of devices) already leaves every target device its target shard."""
  src, dst = L(0, fsdp=2, tensor=2).named("fsdp", "tensor"), L(0, tensor=2).named(None, "tensor")
  refs = {"w": _value((8, 8), np.float32, 0), "b": _value((8, 4), jnp.bfloat16, 1)}
  xs, _ = _move(refs, {"w": src, "b": src}, dst, hardware=BYTES_ONLY)
  (prog,), _ = _programs_of(xs, dst, hardware=BYTES_ONLY)
  assert set(prog.bp.kinds.values()) == {"passthrough"} and not prog.puts
  assert [p.inter for p in plans(xs, dst, BYTES_ONLY)] == [p.inter for p in prog.bp.leaf_plans.values()]
  for p in prog.bp.leaf_plans.values():
    assert p.inter.spec == P(None, "fsdp") and p.inter.mesh.shape["fsdp"] == 2 and p.inter.mesh.shape["data"] == 2


@pytest.mark.parametrize("schedule", ["serial", "pipelined"])
def test_direct_path_respects_the_bucket_bound(monkeypatch, schedule):
  """fsdp2 -> device 1, eight leaves sharded along a minor dimension, one per bucket: whenever the host
  waits for a bucket (the memory bound), the buffers alive on device 1 besides the sources and the
  results (the received shards) are at most two buckets' worth."""
  from sharding import realloc as R
  dev1 = jax.devices()[1]
  src, one = L(0, fsdp=2).named(None, "fsdp"), L(1).named()
  refs = {f"w{i}": _value((4, 8, 6), np.float32, i) for i in range(8)}
  xs = {k: jax.device_put(r, src) for k, r in refs.items()}
  leaf_bytes = 4 * 8 * 6 * 4
  sources = {sh.data.unsafe_buffer_pointer() for x in xs.values() for sh in x.addressable_shards}
  extra = []

  def wait(x):
    live = {}
    for a in jax.live_arrays():
      for sh in a.addressable_shards:
        if sh.device == dev1 and sh.data.shape != (4, 8, 6):
          live[sh.data.unsafe_buffer_pointer()] = sh.data.nbytes
    extra.append(sum(n for p, n in live.items() if p not in sources))
    return jax.block_until_ready(x)

  monkeypatch.setattr(R, "_wait", wait)
  with jax.transfer_guard("disallow"):
    ys = reallocate(xs, one, bucket_bytes=leaf_bytes, hardware=BYTES_ONLY, schedule=schedule, direct=True)
    jax.block_until_ready(ys)
  jax.tree.map(_check, ys, refs, {k: one for k in refs})
  assert len(extra) == 8 - 2 and max(extra) <= 2 * leaf_bytes and max(extra) > 0, extra


def test_host_terms_by_hand():
  """The host clock of a call, by hand (`_realloc_cost` docstring): `call_s` once (the Python prologue),
  then per bucket `dispatch_s` per program AND per batched device_put, `leaf_arg_s` per program array,
  `transfer_latency_s` per copied buffer. A slice-only bucket (one same-device program, 4 arrays, 2 GB of
  HBM passes per device) starts its program after call_s + its dispatch: 1 + 2 + 4 * 0.25 = 4 s of
  host, then 2 s of HBM. A packed bucket: pack (1 + 2 arrays * 0.25), device_put (1 + 2 buffers * 0.5),
  unpack (1 + 1 array * 0.25) = 4.75 s of host after call_s; the copies start when the host has
  dispatched them (1 + 1.5 + 2 = 4.5 s; the pack, 1 s from 2.5, is done) and take 2 s, then the unpack
  (1 s): 7.5 s."""
  from sharding._realloc_cost import BucketLoad, timeline
  from sharding.hardware import H200, H200_X4, for_card, for_machine
  d0, d1 = jax.devices()[:2]
  hw = Hardware("t", 8, 1.0, 1.0, 2.0, 1.0, 0.5, 1.0, dispatch_s=2.0, collective_latency_s=0.0, leaf_arg_s=0.25,
                leaf_assemble_s=0.0, call_s=1.0)
  sliced = BucketLoad(collective_bytes=0, collectives=0, packed={}, pairs={}, built={}, programs=1, transfers=0,
                      assembled_arrays=0, program_arrays=4, collective_hbm_bytes=4, collective_devices=(d0, d1),
                      collective_programs=1, collective_arrays=4)
  assert timeline([sliced], hw, waits=False) == (4.0, 6.0)
  fast = dataclasses.replace(hw, dispatch_s=1.0)
  packed = BucketLoad(collective_bytes=0, collectives=0, packed={d0: 1}, pairs={(d0, d1): 2, (d1, d0): 2},
                      built={d1: 1}, programs=2, transfers=2, assembled_arrays=0, program_arrays=3, pack_programs=1,
                      pack_arrays=2, holds_intermediates=True)
  assert timeline([packed], fast, waits=False) == (5.75, 7.5)
  # The same copies in two rounds: one more batched device_put, 1 s more host before the copies.
  assert timeline([dataclasses.replace(packed, transfer_calls=2)], fast, waits=False) == (6.75, 8.5)
  assert for_card("NVIDIA H200") is H200 and for_card("NVIDIA H100 80GB HBM3") is H100_SXM
  assert for_card("cpu") is H100_SXM
  assert for_machine("NVIDIA H200", 4) is H200_X4 and for_machine("NVIDIA H200", 2) is H200
  assert for_machine("NVIDIA H100 80GB HBM3", 4) is H100_SXM and for_machine("NVIDIA GH200", 4) is H100_SXM


def _rounds_of(bp):
  """[(source id, target id)] per issue round of a bucket plan."""
  pair = lambda ci, j: (bp.classes[ci].srcs[j].id, bp.classes[ci].mesh.devices.flat[j].id)  # noqa: E731
  return [[pair(ci, j) for ci, j in rnd] for rnd in bp.rounds]


@pytest.mark.parametrize("name", list(CASES))
def test_copy_rounds_partition_the_copies(name):
  """Every copy is in exactly one round, in the order of `transfers`; a pair's copies share a round; a
  source sends to one destination per round; there are as many rounds as the most destinations of one
  source (one batched device_put each)."""
  from sharding._realloc_plan import LeafSpec, plan_tree
  src, dst = CASES[name]
  specs = tuple(LeafSpec(shape, "float32", src, dst) for shape in ((16, 8), (32, 8), (16, 16)))
  for bp in plan_tree(specs, BYTES_ONLY, "auto", None, "serial", False).buckets:
    rounds = _rounds_of(bp)
    assert [t for rnd in bp.rounds for t in rnd] == list(bp.transfers)
    assert bp.load.transfer_calls == len(rounds) and all(rounds)
    where = {}
    for r, rnd in enumerate(rounds):
      srcs = [s for s, _ in dict.fromkeys(rnd)]
      assert len(srcs) == len(set(srcs)), (name, r, rnd)
      for p in rnd:
        assert where.setdefault(p, r) == r, (name, p)
    dests = {}
    for s, d in where:
      dests.setdefault(s, set()).add(d)
    assert len(rounds) == max(map(len, dests.values()), default=0), (name, rounds)


def test_copy_rounds_spread_over_targets(monkeypatch):
  """fsdp4 -> tensor2 on two of the four devices (the 4x H200 trace in `_transfer_slots`): devices 2 and
  3 each send to both targets; in the first round they send to different ones, so each target takes
  two sources in round 0 and one in round 1. Executed as one batched device_put per round, values exact."""
  src, dst = L(0, fsdp=4).named(None, "fsdp"), L(0, tensor=2).named("tensor")
  refs = {f"w{i}": _value((16, 8), np.float32, i) for i in range(3)}
  puts = []
  put = jax.device_put
  monkeypatch.setattr(jax, "device_put", lambda x, *a, **k: (puts.append(len(x) if isinstance(x, list) else 1),
                                                             put(x, *a, **k))[1])
  xs, _ = _move(refs, jax.tree.map(lambda _: src, refs), dst, hardware=BYTES_ONLY)
  (prog,), _ = _programs_of(xs, dst, hardware=BYTES_ONLY)
  r0, r1 = (sorted(set(r)) for r in _rounds_of(prog.bp))
  assert r0 == [(0, 1), (1, 0), (2, 0), (3, 1)] and r1 == [(2, 1), (3, 0)]
  assert puts[-2:] == [len(prog.bp.rounds[0]), len(prog.bp.rounds[1])]
  assert [len(keys) for keys, _ in prog.local_rounds] == [len(r) for r in prog.bp.rounds]

"""Search: candidates, HLO collectives, simulator, MCMC vs exhaustive, baselines, estimator cache, CLI."""

import itertools
import json
import math
import os

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from search import CallSpec, Estimator, ModelShape, Profile
from search.hlo import collectives
from search.search import Planner
from search.simulate import simulate
from search.space import ReallocPricer, candidates
from sharding import Layout

SHAPE = ModelShape(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, vocab_size=64,
                   params=50_000)
PROFILE = Profile("test", 8, matmul_flops=1e12, hbm_bandwidth=1e11, d2d_bandwidth=1e10, inter_host_bandwidth=1e9,
                  intra_mesh_collective_bandwidth=1e10, memory_bytes=1e9)


def _spec(name, model, kind, **kw):
  base = dict(seq_len=32) if kind != "generate" else dict(prompt_len=16, new_tokens=16)
  return CallSpec(name, model, kind, kw.pop("batch", 64), SHAPE, **(base | kw))


def test_candidates_are_valid():
  spec = _spec("a", "m", "inference", batch=8)
  lays = candidates(spec, 16, 8)
  assert lays
  for l in lays:
    dm, st = l.device_mesh, l.strategy
    dm.validate(devices_per_host=8, num_devices=16)
    assert st.tensor <= 8 and SHAPE.n_heads % st.tensor == 0 and 8 % (st.data * st.fsdp * st.micro_batches) == 0
  assert {l.device_mesh.size for l in lays} == {1, 2, 4, 8, 16}
  gen = candidates(_spec("g", "m", "generate"), 8, 8)
  assert all(l.strategy.micro_batches == 1 for l in gen)
  assert all(l.strategy.tensor <= 4 for l in gen)  # 4 heads


def test_collectives_from_compiled_hlo():
  mesh = Layout.on(0, data=2, fsdp=2, tensor=2).mesh

  def f(x, w):
    y = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=10)[0]
    return y.sum()

  x = jax.ShapeDtypeStruct((128, 128), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
  w = jax.ShapeDtypeStruct((128, 128), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("fsdp", "tensor")))
  colls = collectives(jax.jit(f).lower(x, w).compile().as_text(), 8)
  kinds = sorted(c.kind for c in colls)
  assert "all-gather" in kinds and "all-reduce" in kinds
  assert all(c.result_bytes > 0 and c.group_size in (2, 4, 8) for c in colls)
  assert max(c.count for c in colls) == 10  # an op inside the scan body is counted per trip


def test_collective_parsing_known_text():
  text = """HloModule m
%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %ag = f32[4,8]{1,0} all-gather(%x), channel_id=1, replica_groups={{0,1},{2,3}}, dimensions={1}
}
%cond (p: (s32[], f32[4,8])) -> pred[] {
  %c = pred[] constant(true)
}
ENTRY %main (a: f32[4,8]) -> f32[4,8] {
  %w = (s32[], f32[4,8]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %ar = bf16[16]{0} all-reduce(%y), channel_id=2, replica_groups=[1,4]<=[4], to_apply=%add
}
"""
  c = {x.kind: x for x in collectives(text, 4)}
  assert c["all-gather"].count == 5 and c["all-gather"].group_size == 2 and c["all-gather"].result_bytes == 128
  assert c["all-gather"].wire_bytes == 64
  assert c["all-reduce"].group_size == 4 and c["all-reduce"].result_bytes == 32
  assert c["all-reduce"].wire_bytes == pytest.approx(2 * 32 * 3 / 4)


def _sim(specs, layouts, secs, **kw):
  tasks = [((0, n), deps) for n, deps in kw.pop("deps").items()]
  costs = {n: Estimator(PROFILE, mode="analytic", cache_dir="").cost(specs[n], layouts[n]) for n in specs}
  return simulate(tasks, specs, layouts, secs, costs, PROFILE, 8, ReallocPricer(specs, PROFILE), record=True, **kw)


def test_disjoint_meshes_overlap_and_overlapping_serialise():
  specs = {"a": _spec("a", "m1", "inference"), "b": _spec("b", "m2", "inference")}
  deps = {"a": [], "b": []}
  disjoint = _sim(specs, {"a": Layout.on(0, data=4), "b": Layout.on(4, data=4)}, {"a": 1.0, "b": 2.0}, deps=deps)
  assert disjoint.makespan == pytest.approx(2.0)
  overlap = _sim(specs, {"a": Layout.on(0, data=8), "b": Layout.on(4, data=4)}, {"a": 1.0, "b": 2.0}, deps=deps)
  assert overlap.makespan == pytest.approx(3.0)


def test_reallocation_once_per_parameter_version():
  specs = {"gen": _spec("gen", "actor", "generate"), "inf": _spec("inf", "actor", "inference"),
           "train": _spec("train", "actor", "train_step", trained=True)}
  lays = {"gen": Layout.on(4, data=4), "inf": Layout.on(4, data=4), "train": Layout.on(0, fsdp=4)}
  tasks = []
  for i in range(3):
    tasks += [((i, "gen"), [(i - 1, "train")] if i else []), ((i, "inf"), [(i, "gen")]),
              ((i, "train"), [(i, "inf")])]
  est = Estimator(PROFILE, mode="analytic", cache_dir="")
  costs = {n: est.cost(specs[n], lays[n]) for n in specs}
  pricer = ReallocPricer(specs, PROFILE)
  r = simulate(tasks, specs, lays, {"gen": 1.0, "inf": 1.0, "train": 1.0}, costs, PROFILE, 8, pricer, record=True)
  moves = [e for e in r.events if e.kind == "realloc"]
  assert len(moves) == 3  # home (train layout) -> gen layout once per iteration; inf reuses the copy
  assert r.realloc_seconds == pytest.approx(3 * pricer("actor", lays["train"], lays["gen"]))
  assert r.makespan == pytest.approx(9.0 + r.realloc_seconds)


def test_memory_infeasibility():
  big = ModelShape(4096, 32, 32, 32, 128, 11008, 32000, params=7_000_000_000)
  specs = {"train": CallSpec("train", "actor", "train_step", 8, big, seq_len=128, trained=True)}
  lay = {"train": Layout.on(0, data=8)}  # 7B with Adam replicated on every device: 84 GB > 1 GB
  r = _sim(specs, lay, {"train": 1.0}, deps={"train": []})
  assert not r.feasible and math.isinf(r.time) and "GiB" in r.reason


def _ppo_like(batch=16):
  specs = {"gen": _spec("gen", "actor", "generate", batch=batch),
           "ref": _spec("ref", "ref", "inference", batch=batch),
           "train": _spec("train", "actor", "train_step", batch=batch, trained=True)}
  tasks = []
  for i in range(3):
    tasks += [((i, "gen"), [(i - 1, "train")] if i else []), ((i, "ref"), [(i, "gen")]),
              ((i, "train"), [(i, "ref")])]
  return specs, tasks


def test_mcmc_finds_exhaustive_optimum_and_baselines_reported():
  specs, tasks = _ppo_like()
  est = Estimator(PROFILE, mode="analytic", cache_dir="")
  planner = Planner(specs, tasks, est, 4, micro_batches=(1,))
  assert planner.space_size < 5000
  best_lays, best = planner.exhaustive()
  found, r = planner.mcmc({c: planner.cands[c][0] for c in planner.calls}, steps=4000, seed=1)
  assert r.time == pytest.approx(best.time, rel=1e-9)
  res = planner.search()
  assert res.method == "exhaustive" and set(res.baselines) == {"colocated", "disaggregated"}
  assert all(res.result.time <= r.time + 1e-12 for _, r in res.baselines.values())


def _offload_setting():
  """PPO-like calls whose peak is the actor's (a 64k vocabulary) while a 30M-parameter reference rests."""
  specs, tasks = _ppo_like()
  specs["ref"] = dataclasses_replace(specs["ref"], shape=dataclasses_replace(SHAPE, params=30_000_000))
  for k in ("gen", "train"):
    specs[k] = dataclasses_replace(specs[k], shape=dataclasses_replace(SHAPE, vocab_size=64000),
                                   seq_len=256 if k == "train" else None)
  return specs, tasks


def _planner(specs, tasks, memory_bytes, **kw):
  prof = dataclasses_replace(PROFILE, memory_bytes=memory_bytes)
  return Planner(specs, tasks, Estimator(prof, mode="analytic", cache_dir=""), 4, micro_batches=(1,), **kw)


def test_offload_makes_a_plan_fit_and_never_touches_one_that_fits():
  from search.plan import ExecutionPlan
  specs, tasks = _offload_setting()
  roomy = _planner(specs, tasks, 1e12)
  assert roomy.offload_sets == [frozenset({"ref"})]  # frozen models only: the trained actor never rests
  lays = {c: Layout.on(0, data=4) for c in specs}
  plain = roomy.evaluate(lays, offload=frozenset())
  rested = roomy.evaluate(lays, offload=frozenset({"ref"}))
  assert rested.peak_memory.max() < plain.peak_memory.max() and rested.time > plain.time  # host loads cost time
  assert roomy.evaluate(lays).offload == frozenset() and roomy.evaluate(lays).time == plain.time
  # Room between the two peaks: the plan fits only with the reference in host memory.
  usable = (plain.peak_memory.max() + rested.peak_memory.max()) / 2
  tight = _planner(specs, tasks, usable / (1 - PROFILE.memory_reserve))
  assert not tight.evaluate(lays, offload=frozenset()).feasible
  r = tight.evaluate(lays, record=True)
  assert r.feasible and r.offload == {"ref"} and r.time == pytest.approx(rested.time)
  assert [e.name for e in r.events if e.kind == "load"] == ["load ref"] * 3  # before each ref call
  # The search: never slower than without offload; a plan it reports carries the offload its score needed.
  res = tight.search()
  without = _planner(specs, tasks, usable / (1 - PROFILE.memory_reserve), offload=False).search()
  assert res.result.feasible and res.result.time <= without.result.time
  assert res.plan.offload == res.result.offload
  assert tight.evaluate(res.plan.layouts, offload=res.plan.offload).time == pytest.approx(res.result.time)
  assert ExecutionPlan.parse(res.plan.to_text()).offload == res.plan.offload
  for p, rb in res.baselines.values():
    assert p.offload == rb.offload and (not p.offload or not tight.evaluate(p.layouts, offload=frozenset()).feasible)
  # Room below every plan's peak without offload but above the best with it: only resting plans exist.
  peaks = [min(roomy.evaluate(dict(zip(roomy.calls, combo)), offload=off).peak_memory.max()
               for combo in itertools.product(*(roomy.cands[c] for c in roomy.calls)))
           for off in (frozenset(), frozenset({"ref"}))]
  assert peaks[1] < peaks[0]
  tighter = (peaks[0] + peaks[1]) / 2 / (1 - PROFILE.memory_reserve)
  assert math.isinf(_planner(specs, tasks, tighter, offload=False).search().result.time)
  res = _planner(specs, tasks, tighter).search()
  assert res.result.feasible and res.plan.offload == {"ref"} and res.baselines["colocated"][0].offload == {"ref"}


def test_offload_takes_the_fastest_set_that_fits():
  """Two frozen models of different sizes: a plan that does not fit is scored with each of the three sets
  resting in host memory and keeps the fastest that fits (not the first, not the largest)."""
  specs, tasks = _offload_setting()
  specs["rew"] = dataclasses_replace(specs["ref"], name="rew", model="rew",
                                     shape=dataclasses_replace(SHAPE, params=10_000_000))
  tasks = []
  for i in range(3):
    tasks += [((i, "gen"), [(i - 1, "train")] if i else []), ((i, "ref"), [(i, "gen")]), ((i, "rew"), [(i, "gen")]),
              ((i, "train"), [(i, "ref"), (i, "rew")])]
  lays = {c: Layout.on(0, data=4) for c in specs}
  roomy = _planner(specs, tasks, 1e12)
  assert sorted(map(sorted, roomy.offload_sets)) == [["ref"], ["ref", "rew"], ["rew"]]
  each = {off: roomy.evaluate(lays, offload=off) for off in [frozenset()] + roomy.offload_sets}
  plain = each.pop(frozenset())
  for usable in sorted({r.peak_memory.max() for r in each.values()}):
    if usable >= plain.peak_memory.max():
      continue  # The plan fits as it is: nothing rests.
    usable *= 1 + 1e-9  # (exactly at a peak: no rounding below it)
    tight = _planner(specs, tasks, usable / (1 - PROFILE.memory_reserve))
    fits = {off: r.time for off, r in each.items() if r.peak_memory.max() <= usable}
    r = tight.evaluate(lays)
    assert r.feasible and r.offload == min(fits, key=fits.get) and r.time == pytest.approx(min(fits.values()))
  with pytest.raises(ValueError, match=r"call 'gen': layout .* is not one of its \d+ candidates"):
    roomy.evaluate({**lays, "gen": Layout.on(0, data=8)})  # 8 devices: this planner has 4


def test_estimator_compiles_and_caches_on_disk(tmp_path):
  def lower(layout):
    sh = NamedSharding(layout.mesh, PartitionSpec(("data", "fsdp")))
    wsh = NamedSharding(layout.mesh, PartitionSpec("fsdp", "tensor"))
    x = jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=sh)
    w = jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=wsh)
    return {"main": jax.jit(lambda x, w: jnp.tanh(x @ w) @ w.T).lower(x, w)}

  spec = CallSpec("inf", "m", "inference", 64, dataclasses_replace(SHAPE, n_layers=1), seq_len=1, lower=lower)
  est = Estimator(PROFILE, cache_dir=str(tmp_path))
  for lay in (Layout.on(0, fsdp=2), Layout.on(0, data=2, tensor=2), Layout.on(0, fsdp=4, tensor=2)):
    c = est.cost(spec, lay)
    assert c.tier == "compiled" and c.flops > 0 and c.hbm_bytes > 0 and c.arg_bytes + c.temp_bytes > 0
  assert est.compiles == 3 and len(os.listdir(tmp_path)) == 3
  again = Estimator(PROFILE, cache_dir=str(tmp_path))
  again.cost(spec, Layout.on(0, fsdp=2))
  assert again.compiles == 0 and again.disk_hits == 1
  assert est.cost(spec, Layout.on(0, fsdp=4, tensor=2)).comm_intra > 0  # fsdp all-gather of w


def dataclasses_replace(x, **kw):
  import dataclasses
  return dataclasses.replace(x, **kw)


def test_cli_writes_plan_and_png(tmp_path):
  from search.__main__ import main
  from search.plan import ExecutionPlan
  root = os.path.dirname(os.path.dirname(__file__))
  main(["--config", os.path.join(root, "configs/ppo_tiny.py"), "--profile", "h100_sxm", "--out", str(tmp_path),
        "--steps", "200", "--cache-dir", "", "--platform", "gpu"])
  plan = ExecutionPlan.load(str(tmp_path / "plan.json"))
  assert len(plan.layouts) == 6
  d = json.loads((tmp_path / "plan.json").read_text())
  assert d["predicted_s"] > 0 and "colocated" in d["meta"]["baselines"]
  assert (tmp_path / "timeline.png").read_bytes()[:4] == b"\x89PNG"


def _actor_plan_tasks():
  specs = {"gen": _spec("gen", "actor", "generate"), "inf": _spec("inf", "actor", "inference"),
           "train": _spec("train", "actor", "train_step", trained=True)}
  tasks = []
  for i in range(3):
    tasks += [((i, "gen"), [(i - 1, "train")] if i else []), ((i, "inf"), [(i, "gen")]),
              ((i, "train"), [(i, "inf")])]
  return specs, tasks


def test_micro_batches_only_difference_moves_nothing():
  specs, tasks = _actor_plan_tasks()
  est = Estimator(PROFILE, mode="analytic", cache_dir="")
  pricer = ReallocPricer(specs, PROFILE)
  secs = {"gen": 1.0, "inf": 1.0, "train": 1.0}

  def run(lays):
    costs = {n: est.cost(specs[n], lays[n]) for n in specs}
    return simulate(tasks, specs, lays, secs, costs, PROFILE, 8, pricer, record=True)

  same = run({"gen": Layout.on(0, fsdp=4), "inf": Layout.on(0, fsdp=4), "train": Layout.on(0, fsdp=4)})
  mixed = run({"gen": Layout.on(0, fsdp=4), "inf": Layout.on(0, fsdp=4, micro_batches=4),
               "train": Layout.on(0, fsdp=4, micro_batches=2)})
  assert pricer("actor", Layout.on(0, fsdp=4, micro_batches=2), Layout.on(0, fsdp=4)) == 0.0
  assert pricer.analytic("actor", Layout.on(0, fsdp=4, micro_batches=2), Layout.on(0, fsdp=4)) == 0.0
  assert not [e for e in mixed.events if e.kind == "realloc"] and mixed.realloc_seconds == 0.0
  assert mixed.makespan == pytest.approx(9.0) == same.makespan
  # No second copy of the parameters is charged either (only the calls' transient bytes differ).
  home = Layout.on(0, fsdp=4)
  resident = (SHAPE.params / 4) * (SHAPE.param_bytes + 8)
  biggest = max(est.cost(specs[n], l).temp_bytes for n, l in
                (("gen", home), ("inf", Layout.on(0, fsdp=4, micro_batches=4)),
                 ("train", Layout.on(0, fsdp=4, micro_batches=2))))
  assert mixed.peak_memory.max() == pytest.approx(resident + biggest)


def test_equivalent_rule_sets_move_nothing():
  from search.space import placement
  from sharding import DeviceMesh, Strategy
  specs, _ = _actor_plan_tasks()
  pricer = ReallocPricer(specs, PROFILE)
  fsdp_rules = Layout(DeviceMesh(0, 4), Strategy(1, 4, 1), "fsdp")  # tensor=1: the same shards as "auto"
  assert placement(fsdp_rules) == placement(Layout.on(0, fsdp=4, micro_batches=2)) == Layout.on(0, fsdp=4)
  assert pricer("actor", fsdp_rules, Layout.on(0, fsdp=4)) == 0.0
  assert pricer("actor", Layout(DeviceMesh(0, 4), Strategy(1, 4, 1), "replicated"), Layout.on(0, fsdp=4)) > 0


def _tree_pricer(specs):
  """A pricer with a real (abstract) parameter tree: [embed, mlp] and [mlp, embed] matrices and a norm."""
  from sharding import shardings_for  # noqa: F401  (the tree path calls sharding.realloc_cost)
  shapes = {"up": jax.ShapeDtypeStruct((64, 128), jnp.float32), "down": jax.ShapeDtypeStruct((128, 64), jnp.float32),
            "norm": jax.ShapeDtypeStruct((64,), jnp.float32)}

  def shardings(layout):
    return {"up": layout.named("fsdp", "tensor"), "down": layout.named("tensor", "fsdp"), "norm": layout.named("fsdp")}
  return ReallocPricer(specs, PROFILE, trees={"actor": (shapes, shardings)}), shapes, shardings


def test_identical_shardings_cost_zero_on_the_tree_path():
  from sharding import realloc_cost
  specs, _ = _actor_plan_tasks()
  pricer, shapes, shardings = _tree_pricer(specs)
  a, b = Layout.on(0, data=2, fsdp=2, micro_batches=4), Layout.on(0, data=2, fsdp=2)
  assert realloc_cost(shardings(a), shardings(b), shapes, PROFILE.hardware) == 0.0
  assert pricer("actor", a, b) == 0.0
  moved = pricer("actor", Layout.on(0, fsdp=4), Layout.on(0, tensor=4))
  assert moved == pytest.approx(realloc_cost(shardings(Layout.on(0, fsdp=4)), shardings(Layout.on(0, tensor=4)),
                                             shapes, PROFILE.hardware)) and moved > 0


def test_analytic_pricer_charges_only_missing_bytes():
  from search.space import received_fractions
  specs, _ = _actor_plan_tasks()
  pricer = ReallocPricer(specs, PROFILE)
  total = SHAPE.params * SHAPE.param_bytes
  lat = SHAPE.n_leaves() * PROFILE.transfer_latency_s
  # Replicated source: every device already holds its fsdp / tensor shard, or the whole matrix.
  assert set(received_fractions(Layout.on(0, data=4), Layout.on(0, fsdp=4)).values()) == {0.0}
  assert pricer.analytic("actor", Layout.on(0, data=4), Layout.on(0, fsdp=4)) == pytest.approx(lat)
  assert pricer.analytic("actor", Layout.on(0, data=4), Layout.on(0, data=2)) == pytest.approx(lat)
  # fsdp4 -> tensor4 on the same devices: each device keeps a quarter of its new column block.
  frac = received_fractions(Layout.on(0, fsdp=4), Layout.on(0, tensor=4))
  assert sorted(frac.values()) == pytest.approx([0.25 - 0.25 / 4] * 4)
  assert pricer.analytic("actor", Layout.on(0, fsdp=4), Layout.on(0, tensor=4)) == pytest.approx(
      frac[0] * total / PROFILE.intra_mesh_collective_bandwidth + lat)
  # Disjoint devices: every shard crosses, the busiest receiver's quarter over the d2d link.
  assert pricer.analytic("actor", Layout.on(0, fsdp=4), Layout.on(4, fsdp=4)) == pytest.approx(
      total / 4 / PROFILE.d2d_bandwidth + lat)


def test_zero_priced_reallocation_adds_no_task():
  specs, tasks = _actor_plan_tasks()
  lays = {"gen": Layout.on(4, data=4), "inf": Layout.on(4, data=4), "train": Layout.on(0, fsdp=4)}
  est = Estimator(PROFILE, mode="analytic", cache_dir="")
  costs = {n: est.cost(specs[n], lays[n]) for n in specs}
  r = simulate(tasks, specs, lays, {"gen": 1.0, "inf": 1.0, "train": 1.0}, costs, PROFILE, 8,
               lambda model, src, dst: 0.0, record=True)
  assert not [e for e in r.events if e.kind == "realloc"] and r.makespan == pytest.approx(9.0)


def test_a_copy_occupies_memory_until_its_last_reader_of_the_iteration():
  """Frozen model f (home data=8 on 0-7) read under tensor=4 on 0-3 by r1 and r3; an unrelated call r2
  on 0-3 runs between them and must see f's copy, r4 after r3 must not; each iteration moves f again."""
  from search.simulate import resident_bytes
  big = ModelShape(1024, 4, 8, 8, 128, 4096, 1000, params=100_000_000, param_bytes=2)
  f = dict(seq_len=32)
  specs = {n: CallSpec(n, m, "inference", 8 if m == "f" else 64, big, **f)
           for n, m in [("r0", "f"), ("r1", "f"), ("r2", "g"), ("r3", "f"), ("r4", "g")]}
  home, t4 = Layout.on(0, data=8), Layout.on(0, tensor=4)
  order = ["r0", "r1", "r2", "r3", "r4"]
  tasks = [((i, n), [(i, order[j - 1])] if j else ([(i - 1, "r4")] if i else [])) for i in range(2)
           for j, n in enumerate(order)]
  est = Estimator(PROFILE, mode="analytic", cache_dir="")
  secs = {n: 1.0 for n in specs}
  prof = PROFILE.replace(memory_bytes=1e12)

  def run(lays):
    costs = {n: est.cost(specs[n], lays[n]) for n in specs}
    return simulate(tasks, specs, lays, secs, costs, prof, 8, ReallocPricer(specs, prof), record=True), costs

  lays = {"r0": home, "r1": t4, "r2": t4, "r3": t4, "r4": t4}
  r, costs = run(lays)
  f_home, g_home, copy = (resident_bytes(specs["r0"], home, False), resident_bytes(specs["r2"], t4, False),
                          resident_bytes(specs["r1"], t4, False))
  assert costs["r2"].temp_bytes > costs["r1"].temp_bytes
  assert r.peak_memory[0] == pytest.approx(f_home + g_home + copy + costs["r2"].temp_bytes)  # r2 beside the copy
  assert r.peak_memory[5] == pytest.approx(f_home + costs["r0"].temp_bytes)
  assert [e.kind for e in r.events].count("realloc") == 2  # once per iteration
  # r3 under home instead: r1 is the copy's last reader, so r2 runs without it.
  r, costs = run(lays | {"r3": home})
  assert r.peak_memory[0] == pytest.approx(f_home + g_home + max(copy + costs["r1"].temp_bytes,
                                                                 costs["r2"].temp_bytes, costs["r3"].temp_bytes))


def test_estimator_counts_the_compute_dtype_copy_of_fp32_parameters():
  """Calls cast stored fp32 parameters to bf16 up front; XLA keeps the cast shard for the call."""
  import dataclasses
  f32, bf16 = SHAPE, dataclasses.replace(SHAPE, param_bytes=2)
  est = Estimator(PROFILE, mode="analytic", cache_dir="")
  for kind, lay in [("inference", Layout.on(0, fsdp=2, tensor=2)), ("generate", Layout.on(0, tensor=4)),
                    ("train_step", Layout.on(0, fsdp=4))]:
    a, b = (est.cost(CallSpec("c", "m", kind, 8, s, **(dict(prompt_len=16, new_tokens=16) if kind == "generate"
                                                         else dict(seq_len=32))), lay) for s in (f32, bf16))
    st = lay.strategy
    assert a.temp_bytes - b.temp_bytes == pytest.approx(SHAPE.params * 2 / (st.fsdp * st.tensor)), kind


def test_comm_classes_all_reduce_apart_from_gathers():
  """Both tiers tell all-reduces (tensor activations, data-parallel gradients) from FSDP gathers and
  scatters, and each class is priced with its own factor (`reduce_time`, `comm_time`)."""
  est = Estimator(PROFILE, mode="analytic", cache_dir="")
  for kind in ("inference", "train_step", "generate"):
    spec = _spec("c", "m", kind, batch=8)
    fsdp, tensor, both = (est.cost(spec, Layout.on(0, **kw)) for kw in (dict(fsdp=4), dict(tensor=4),
                                                                         dict(fsdp=2, tensor=2)))
    assert fsdp.comm_intra > 0 and fsdp.reduce_share == 0.0, kind
    assert tensor.comm_intra > 0 and tensor.reduce_share == pytest.approx(1.0), kind
    assert 0.0 < both.reduce_share < 1.0, kind
  data = est.cost(_spec("c", "m", "train_step", batch=8), Layout.on(0, data=4))  # The gradient all-reduce.
  assert data.comm_intra > 0 and data.reduce_share == pytest.approx(1.0)

  # Pricing: the all-reduce share at reduce_time, the rest at comm_time, in link seconds.
  spec = _spec("c", "m", "train_step", batch=8)
  cost = est.cost(spec, Layout.on(0, fsdp=2, tensor=2))
  link = cost.comm_intra / PROFILE.intra_mesh_collective_bandwidth
  for cal in ({}, {"comm_time": 0.25}, {"reduce_time": 3.0}, {"comm_time": 0.5, "reduce_time": 2.0}):
    prof = PROFILE.replace(calibration={"train_step": cal})
    want = link * ((1 - cost.reduce_share) * cal.get("comm_time", 1.0) + cost.reduce_share * cal.get("reduce_time", 1.0))
    assert cost.parts(prof)["comm"] == pytest.approx(want), cal

  # Each class on its own link: all-reduces inside a host, gathers across hosts (and the reverse).
  from search.estimator import CallCost
  bw_in, bw_out = PROFILE.intra_mesh_collective_bandwidth, PROFILE.inter_host_bandwidth
  inside = CallCost(0, 0, 10e9, 10e9, 0, 0, kind="train_step", comm_reduce=10e9)
  across = dataclasses_replace(inside, comm_reduce_inter=10e9)
  assert inside.link_seconds(PROFILE) == pytest.approx((10e9 / bw_out, 10e9 / bw_in))
  assert across.link_seconds(PROFILE) == pytest.approx((10e9 / bw_in, 10e9 / bw_out))
  # On a mesh of whole hosts the analytic tier puts FSDP and data-parallel traffic on the inter-host link,
  # all-reduces included ...
  wide = est.cost(_spec("c", "m", "train_step", batch=16), Layout.on(0, data=2, fsdp=8))
  assert wide.comm_intra == 0 and wide.comm_reduce_inter == wide.comm_reduce > 0 and wide.colls_intra == 0
  g, r = wide.link_seconds(PROFILE)
  assert r == pytest.approx(wide.comm_reduce / bw_out) and g == pytest.approx((wide.comm_inter - wide.comm_reduce) / bw_out)
  # ... and keeps tensor-parallel all-reduces inside a host: data=2 x tensor=8 on two hosts of 8 is the
  # one-host tensor=8 call's all-reduces inside (each tensor group has the same 8 rows), plus the gradient
  # all-reduce between the hosts.
  for kind in ("train_step", "inference", "generate"):
    tp = est.cost(_spec("c", "m", kind, batch=16), Layout.on(0, data=2, tensor=8))
    host = est.cost(_spec("c", "m", kind, batch=8), Layout.on(0, tensor=8))
    assert host.comm_inter == 0 and host.comm_reduce > 0 and host.comm_tensor == pytest.approx(host.comm_reduce), kind
    assert tp.comm_intra == pytest.approx(host.comm_intra) and tp.colls_intra == host.colls_intra > 0, kind
    data_colls = {"train_step": SHAPE.n_layers + 1, "inference": 0, "generate": 16}[kind]  # generate: done test
    assert tp.colls_inter == data_colls, kind
    if kind == "train_step":
      assert tp.comm_inter == tp.comm_reduce_inter > 0  # the data-parallel gradient all-reduce
    else:
      assert tp.comm_inter == 0, kind
    assert tp.seconds(PROFILE) < dataclasses_replace(tp, comm_intra=0, comm_inter=tp.comm_intra + tp.comm_inter,
                                                     comm_reduce_inter=tp.comm_reduce).seconds(PROFILE), kind

  # Compiled tier: the all-reduce bytes of the HLO (a tensor-split matmul's partial sums) against the
  # all-gathers of an fsdp-split weight.
  def lower(layout):
    x = jax.ShapeDtypeStruct((64, 64), jnp.float32,
                             sharding=NamedSharding(layout.mesh, PartitionSpec(("data", "fsdp"), "tensor")))
    w = jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=NamedSharding(layout.mesh, PartitionSpec("tensor", "fsdp")))
    out = NamedSharding(layout.mesh, PartitionSpec(("data", "fsdp")))
    return {"main": jax.jit(lambda x, w: jnp.tanh(x @ w), out_shardings=out).lower(x, w)}

  cspec = CallSpec("inf", "m", "inference", 64, dataclasses_replace(SHAPE, n_layers=1), seq_len=1, lower=lower)
  cest = Estimator(PROFILE, cache_dir="", mode="compiled")
  gathers = cest.cost(cspec, Layout.on(0, fsdp=4))
  partial = cest.cost(cspec, Layout.on(0, tensor=4))
  assert gathers.comm_intra > 0 and gathers.reduce_share == 0.0
  assert partial.comm_intra > 0 and partial.reduce_share > 0.5

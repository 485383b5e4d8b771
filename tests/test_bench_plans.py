"""bench/plans.py: settings, presets, per-call timing, and a run of its core function on tiny shapes."""

import json
import math

import pytest

from bench import plans as bp
from real_jax.models import get_config, param_count
from search.profile import Profile


def test_bench_presets_param_counts():
  # LLaMA-shaped 1.3B (actor / reference) and 350M (critic / reward) of configs/ppo_bench.py.
  assert param_count(get_config("1.3b"), "lm") == 1_345_423_360
  assert param_count(get_config("350m"), "scalar") == 341_100_544
  assert param_count(get_config("350m"), "lm") == 373_867_520


def test_parse_settings():
  assert bp.parse_settings("1.3b:128, 7b:1024") == [("1.3b", 128), ("7b", 1024)]
  with pytest.raises(ValueError, match="expected MODELS:GEN_TOKENS"):
    bp.parse_settings("1.3b")
  with pytest.raises(ValueError, match="models '13b' not in"):
    bp.parse_settings("13b:128")


def test_bench_experiment_shapes():
  exp = bp.make_experiment("7b", 512)
  assert (exp.data.batch_size, exp.data.max_prompt_len, exp.sampling.max_new_tokens) == (64, 128, 512)
  assert exp.models["actor"].model_config().param_dtype == "float32"
  assert exp.models["ref"].model_config().param_dtype == "bfloat16"
  # Critic and reward share a config (their inference calls share compiled programs); the config does not
  # depend on the generation length (models and their init are reused across settings).
  assert exp.models["critic"].model_config() == exp.models["reward"].model_config()
  assert bp.make_experiment("7b", 128).models["actor"].model_config() == exp.models["actor"].model_config()


def test_busy_times_subtracts_waiting():
  from real_jax.runtime.ppo import ppo_graph

  graph = ppo_graph(8)
  recs = [  # dispatch order; (start, end) on the engine clock
      {"name": "actor:a->b", "kind": "realloc", "devices": (0, 2), "start": 0.0, "end": 1.0},
      {"name": "actor_gen", "kind": "call", "devices": (0, 2), "start": 0.1, "end": 5.0},
      {"name": "reward_inf", "kind": "call", "devices": (2, 1), "start": 0.2, "end": 6.0},  # waits for actor_gen
      {"name": "ref_inf", "kind": "call", "devices": (0, 1), "start": 0.3, "end": 5.5},  # waits for actor_gen
  ]
  assert bp.busy_times(graph, recs) == pytest.approx([1.0, 4.0, 1.0, 0.5])


@pytest.mark.slow
def test_run_bench_tiny(tmp_path):
  """The core function end to end on 2 of the 8 CPU devices: plan, run every plan, JSON after each."""
  out = tmp_path / "plans.json"
  earlier = {"settings": [{"name": "7b:1024", "plans": []}, {"name": "tiny:4:b8", "plans": ["stale"]}]}
  doc = bp.run_bench([("tiny", 4)], out=str(out), profile=Profile.load("h100_sxm"), devices=2, warmup=1, iters=1,
                     batch=8, prompt=8, search_steps=500, log=lambda m: None, merge=earlier)
  saved = json.loads(out.read_text())
  assert [s["name"] for s in saved["settings"]] == [s["name"] for s in doc["settings"]] == ["7b:1024", "tiny:4:b8"]
  for key in ("card", "jax", "date", "devices_used", "settings"):
    assert key in saved, key
  setting = saved["settings"][1]
  assert setting["run"]["jax"] == saved["jax"] and setting["plans"] != ["stale"]
  assert (setting["batch"], setting["prompt_len"], setting["gen_len"]) == (8, 8, 4)
  names = [p["name"] for p in setting["plans"]]
  assert names[0] == "searched" and any(n.startswith("colocated-") for n in names), names
  assert len(setting["plans"]) >= 2
  for p in setting["plans"]:
    assert p["status"] == "ok", (p["name"], p.get("error"))
    assert isinstance(p["plan"], str) and "actor_gen=" in p["plan"]
    for key in ("measured_s", "predicted_s", "predicted_1iter_s", "first_iteration_s"):
      assert math.isfinite(p[key]) and p[key] > 0, (p["name"], key, p[key])
    assert len(p["iteration_s"]) == 1 and p["finite"] and p["tokens_per_s"] > 0
    assert p["metrics"]["response_len"] == 4 and p["metrics"]["no_eos_frac"] == 1.0  # Forced full length.
    assert set(p["calls"]) == {"actor_gen", "reward_inf", "ref_inf", "critic_inf", "actor_train", "critic_train"}
    terms = p["predicted_call_terms"]
    assert set(terms) == set(p["calls"]) and terms["actor_gen"]["layout"] in p["plan"]
    assert terms["actor_train"]["terms_s"]["compute"] > 0 and terms["actor_gen"]["terms_s"]["steps"] >= 0
    for name, c in p["calls"].items():
      assert c["predicted_s"] > 0 and c["measured_s"] >= 0 and c["measured_wall_s"] >= c["measured_s"], (name, c)
    assert p["timeline"] and all(r["t1"] >= r["t0"] for r in p["timeline"])
  distinct = {p["plan"] for p in setting["plans"]}
  assert len(distinct) >= 2  # The tiny search splits the models over the 2 devices: the pool moves them.
  s = setting["summary"]
  assert s["searched_measured_s"] > 0 and s["speedup_measured"] > 0 and "best_heuristic" in s

  # --repredict: the same profile and code predict every measured plan exactly as at run time.
  again = bp.repredict(saved, Profile.load("h100_sxm"), log=lambda m: None)
  assert [st["name"] for st in again["settings"]] == ["7b:1024", "tiny:4:b8"] and again["settings"][0]["plans"] == []
  rows = again["settings"][1]["plans"]
  assert [r["plan"] for r in rows] == names
  for r, p in zip(rows, setting["plans"]):
    assert r["predicted_s"] == pytest.approx(p["predicted_s"], rel=1e-9), p["name"]
    assert r["measured_over_predicted"] == pytest.approx(r["measured_over_predicted_then"], rel=1e-9)
    for name, c in r["calls"].items():
      assert c["predicted_s"] == pytest.approx(p["calls"][name]["predicted_s"], rel=1e-9), (p["name"], name)
  assert again["summary"]["plans"]["n"] == len(names)
  # A profile under which no measured plan fits: each is reported infeasible, none counted, no error.
  tight = dict(saved, profile_memory_bytes=None)
  none_fit = bp.repredict(tight, Profile.load("h100_sxm").replace(memory_bytes=1e3), log=lambda m: None)
  assert all(r["predicted_s"] is None and "GiB usable" in r["infeasible"] for r in none_fit["settings"][1]["plans"])
  assert none_fit["summary"]["plans"]["n"] == 0

  # --call-records: each measured train call as one step of a calibration record, priced like the call.
  from search.calibrate import Case, predict
  recs = bp.call_records(saved, {"tiny:4:b8"}, source="t.json")
  assert bp.call_records(saved, {"7b:1024"}) == []
  assert recs and {r["source"].split()[-1] for r in recs} <= {"actor_train", "critic_train"}
  for r in recs:
    _, _, plan_name, call_name = r["source"].split()
    plan = next(p for p in setting["plans"] if p["name"] == plan_name and not p.get("measured_in"))
    assert r["measured_s"] == pytest.approx(plan["calls"][call_name]["measured_s"] / r["repeats_in_plan"], rel=1e-12)
    assert Case.parse(r["name"]).layout == r["layout"] and f"{call_name}={r['layout']}" in plan["plan"]
    terms = plan["predicted_call_terms"][call_name]["terms_s"]
    assert predict(Profile.load("h100_sxm"), r) * r["repeats_in_plan"] == pytest.approx(sum(terms.values()), rel=1e-6)


def test_fit_profile_geometric_mean_per_kind():
  base = Profile.load("h100_sxm")
  base = base.__class__(**{**base.to_dict(), "calibration": {"generate": {"time": 1.5, "flops": 1.1}}})
  plan = {"status": "ok", "calls": {"actor_gen": {"measured_over_predicted": 2.0},
                                    "ref_inf": {"measured_over_predicted": 4.0},
                                    "critic_inf": {"measured_over_predicted": 1.0},
                                    "actor_train": {"measured_over_predicted": None}}}
  copied = {"status": "ok", "measured_in": "searched", "calls": {"actor_gen": {"measured_over_predicted": 100.0}}}
  fitted_profile, fitted = bp.fit_profile(base, [{"plans": [plan, copied]}])
  assert fitted["generate"]["factor"] == pytest.approx(2.0) and fitted["generate"]["calls"] == 1
  assert fitted["inference"]["factor"] == pytest.approx(2.0) and fitted["inference"]["calls"] == 2
  assert "train_step" not in fitted
  assert fitted_profile.factor("generate", "time") == pytest.approx(3.0)  # On top of the profile's own 1.5.
  assert fitted_profile.factor("generate", "flops") == pytest.approx(1.1)
  assert fitted_profile.factor("inference", "time") == pytest.approx(2.0)
  assert Profile.from_dict(fitted_profile.to_dict()) == fitted_profile


def test_a_failed_plan_run_empties_the_model_pool(tmp_path, monkeypatch):
  """A failed run's models may carry its error (PJRT passes it on to readers): the next plan gets fresh ones."""
  seen = []

  def run_plan(exp, plan, pool, **kw):
    seen.append(dict(pool._items))
    pool._items["actor"] = ("key", None, None)  # What a run gives back before failing.
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 44.14GiB")
  monkeypatch.setattr(bp, "run_plan", run_plan)
  doc = bp.run_bench([("tiny", 4)], out=str(tmp_path / "p.json"), profile=Profile.load("h100_sxm"), devices=2,
                     warmup=1, iters=1, batch=8, prompt=8, search_steps=200, log=lambda m: None)
  plans = doc["settings"][0]["plans"]
  assert len(seen) >= 2 and all(s == {} for s in seen), seen
  assert all(p["status"] == "error" and "44.14GiB" in p["error"] for p in plans if p["status"] != "skipped (budget)")


def test_host_trace_times_the_dispatching_functions(tmp_path):
  from bench import host_trace
  host_trace.install()
  try:
    bp.run_bench([("tiny", 4)], out=str(tmp_path / "p.json"), profile=Profile.load("h100_sxm"), devices=2, warmup=0,
                 iters=1, batch=8, prompt=8, search_steps=100, only=("colocated-d2f1t1",), log=lambda m: None)
  finally:
    host_trace.uninstall()
  seen = {what for what, _, _ in host_trace.LOG}
  assert {"ACTOR_TRAIN", "CRITIC_TRAIN", "train_step", "ppo_adv"} <= seen, seen
  assert all(ln.startswith("TRACE ") for ln in host_trace.lines())


def test_plan_only_predicts_without_running(monkeypatch):
  """--plan-only: per setting and batch the searched plan's and the heuristics' predictions; nothing is
  built or run (the engine is never constructed)."""
  monkeypatch.setattr(bp, "Engine", lambda *a, **k: pytest.fail("--plan-only built an engine"))
  res = bp.plan_only([("tiny", 4)], [8, 16], Profile.load("h100_sxm"), devices=2, search_s=2.0, seed=0,
                     platform=None, log=lambda m: None)
  assert res["predicted_only"] and res["devices"] == 2 and [r["batch"] for r in res["settings"]] == [8, 16]
  for r in res["settings"]:
    assert r["heuristics_s"] and set(r["searched_plan"]) >= {"actor_gen", "actor_train"}
    assert r["speedup_predicted"] == pytest.approx(min(r["heuristics_s"].values()) / r["searched_s"])
    assert r["searched_s"] <= min(r["heuristics_s"].values()) + 1e-9  # the search scores the baselines too


def test_setting_names_carry_a_non_default_batch():
  assert bp.setting_name("7b7b", 1024) == bp.setting_name("7b7b", 1024, 64) == "7b7b:1024"
  assert bp.setting_name("7b7b", 1024, 256) == "7b7b:1024:b256"
  assert bp.split_setting_name("7b7b:1024:b256") == ("7b7b", 1024) == bp.split_setting_name("7b7b:1024")


def test_keep_earlier_merges_only_the_same_plan_measured():
  run = {"card": "H200", "jax": "0.11.2", "date": "2026-11-27"}
  earlier = {"name": "7b7b:1024:b256", "run": run, "plans": [
      {"name": "searched", "plan": "A", "status": "ok", "measured_s": 40.0, "identical_to": ["x"]},
      {"name": "colocated-d1f2t2", "plan": "B", "status": "ok", "measured_s": 55.0},
      {"name": "colocated-d1f4t1", "plan": "C", "status": "error", "measured_s": None}]}
  now = {"name": "7b7b:1024:b256", "plans": [
      {"name": "searched", "plan": "A", "status": "skipped (--only)", "identical_to": []},
      {"name": "colocated-d1f2t2", "plan": "B2", "status": "skipped (--only)", "identical_to": []},
      {"name": "colocated-d1f4t1", "plan": "C", "status": "skipped (budget)", "identical_to": []},
      {"name": "disaggregated", "plan": "D", "status": "ok", "measured_s": 90.0, "identical_to": []}]}
  said = []
  bp.keep_earlier(now, earlier, log=said.append)
  searched, col, failed, dis = now["plans"]
  assert searched["status"] == "ok" and searched["measured_s"] == 40.0 and searched["merged_from"] == run
  assert searched["identical_to"] == []  # This run's twins, not the earlier run's.
  assert col["status"] == "skipped (--only)" and "B2" in said[0]  # Another search result: not merged.
  assert failed["status"] == "skipped (budget)" and dis["measured_s"] == 90.0 and len(said) == 1
  bp.keep_earlier(now, None)


@pytest.mark.parametrize("run_infeasible", [False, True])
def test_plans_predicted_infeasible_run_only_when_asked(tmp_path, monkeypatch, run_infeasible):
  """A plan the simulator says runs out of memory is skipped, or with run_infeasible run and marked (to test
  the memory model, e.g. a colocated tensor=4 heuristic on 4x H200)."""
  import dataclasses
  plan_setting = bp.plan_setting

  def one_infeasible(*a, **k):
    info, cands, planner, graph = plan_setting(*a, **k)
    cands[-1].sim = dataclasses.replace(cands[-1].sim, feasible=False, time=math.inf,
                                        reason="device 0 needs 135.3 GiB > 119.5 GiB usable")
    return info, cands, planner, graph
  ran = []

  def run_plan(exp, plan, pool, **kw):
    ran.append(plan.name)
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 97.95GiB")
  monkeypatch.setattr(bp, "plan_setting", one_infeasible)
  monkeypatch.setattr(bp, "run_plan", run_plan)
  doc = bp.run_bench([("tiny", 4)], out=str(tmp_path / "p.json"), profile=Profile.load("h100_sxm"), devices=2,
                     warmup=1, iters=1, batch=8, prompt=8, search_steps=200, log=lambda m: None,
                     run_infeasible=run_infeasible)
  last = doc["settings"][0]["plans"][-1]
  assert (last["plan_name"] in ran) == run_infeasible, (ran, last["plan_name"])
  if run_infeasible:
    assert last["status"] == "error" and "97.95GiB" in last["error"]
    assert last["predicted_infeasible"].startswith("device 0 needs 135.3 GiB")
  else:
    assert last["status"] == "skipped (predicted infeasible: device 0 needs 135.3 GiB > 119.5 GiB usable)"
    assert "predicted_infeasible" not in last
  saved = json.loads((tmp_path / "p.json").read_text())
  assert saved["settings"][0]["plans"][-1]["status"] == last["status"]


def test_a_heuristic_run_despite_its_prediction_is_measured_but_not_the_predicted_best(tmp_path, monkeypatch):
  """--run-infeasible when the plan fits after all: measured (the best heuristic if fastest), never the best
  predicted one, also once written (its inf prediction becomes null) and merged back by a later call."""
  import dataclasses
  plan_setting = bp.plan_setting

  def one_infeasible(*a, **k):
    info, cands, planner, graph = plan_setting(*a, **k)
    cands[-1].sim = dataclasses.replace(cands[-1].sim, feasible=False, time=math.inf, reason="device 0 needs more")
    return info, cands, planner, graph

  def run_plan(exp, plan, pool, **kw):  # The infeasible plan (run last) measures fastest.
    return {"measured_s": 1.0 if plan.name == last_name[0] else 2.0, "parts": {}}
  last_name = [None]
  monkeypatch.setattr(bp, "plan_setting", one_infeasible)
  monkeypatch.setattr(bp, "run_plan", run_plan)
  names = bp.plan_setting(bp.make_experiment("tiny", 4, batch=8, prompt=8), 2, Profile.load("h100_sxm"),
                          steps=200, colocated="all", log=lambda m: None)[1]
  last_name[0] = names[-1].plan.name
  kw = dict(profile=Profile.load("h100_sxm"), devices=2, warmup=1, iters=1, batch=8, prompt=8, search_steps=200,
            colocated="all", log=lambda m: None, run_infeasible=True)
  doc = bp.run_bench([("tiny", 4)], out=str(tmp_path / "a.json"), **kw)
  setting = doc["settings"][0]
  heur = [p for p in setting["plans"] if p["heuristic"]]
  assert len(heur) >= 2 and heur[-1]["status"] == "ok" and heur[-1]["predicted_infeasible"]
  s = setting["summary"]
  assert s["best_heuristic"] == heur[-1]["name"] and s["best_predicted_heuristic"] != heur[-1]["name"]
  assert s["speedup_measured"] == pytest.approx(0.5) and math.isfinite(s["speedup_predicted"])
  saved = json.loads((tmp_path / "a.json").read_text())
  assert saved["settings"][0]["plans"][-1]["predicted_s"] is None
  again = bp.run_bench([("tiny", 4)], out=str(tmp_path / "b.json"), only=("searched",), merge=saved, **kw)
  merged = again["settings"][0]
  assert merged["plans"][-1].get("merged_from") and merged["plans"][-1]["predicted_s"] is None
  assert merged["summary"]["best_heuristic"] == heur[-1]["name"]
  assert merged["summary"]["best_predicted_heuristic"] == s["best_predicted_heuristic"]

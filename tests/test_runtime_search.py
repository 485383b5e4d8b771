"""`config.plan=search`: the loop asks the search Planner for a plan, runs it, and writes the plan and
the predicted timeline beside the measured one."""

import functools
import json
import os
import sys

from real_jax.experiment import experiment_from_config
from real_jax.metrics import read_jsonl
from real_jax.runtime import run
from search.plan import ExecutionPlan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import ppo_tiny  # noqa: E402


def test_ppo_tiny_with_searched_plan(tmp_path, monkeypatch):
  from real_jax.runtime import loop
  # A 3 s MCMC budget instead of 30 s (the plan only has to be valid and run; the search is tested in
  # tests/test_search.py).
  monkeypatch.setattr(loop, "search_plan", functools.partial(loop.search_plan, time_budget_s=3.0))
  c = ppo_tiny.get_config()
  c.num_iterations, c.sft_warmup_steps, c.data.batch_size, c.sampling.max_new_tokens = 2, 0, 16, 4
  c.plan = "search"
  exp = experiment_from_config(c)
  logs = []
  rows = run(exp, str(tmp_path), log=logs.append, progress=False)
  assert [r["iteration"] for r in rows] == [0, 1]
  saved = json.load(open(tmp_path / "plan.json"))
  assert saved["meta"]["profile"] and saved["predicted_s"] > 0 and set(saved["meta"]["baselines"])
  plan = ExecutionPlan.load(str(tmp_path / "plan.json"))
  predicted = json.load(open(tmp_path / "predicted_timeline.json"))
  assert {e["name"] for e in predicted["events"] if e["kind"] == "call"} == set(plan.layouts)
  assert (tmp_path / "predicted_timeline.png").stat().st_size > 0
  # The measured timeline ran the searched layouts.
  tl = read_jsonl(str(tmp_path / "timeline.jsonl"))
  assert len(tl) == 2
  for r in tl[1]["records"]:
    if r["kind"] == "call":
      lay = plan[r["name"]]
      assert r["devices"] == [lay.device_mesh.start, lay.device_mesh.size], r
  # Run again in the same workdir: the plan is reused (not searched again), the final checkpoint
  # restores under it, and there is nothing left to run.
  logs.clear()
  assert run(exp, str(tmp_path), log=logs.append, progress=False) == []
  assert any("reusing" in str(m) for m in logs), logs
  assert ExecutionPlan.load(str(tmp_path / "plan.json")).layouts == plan.layouts

"""`python -m search --config configs/<exp>.py[:arg] --profile search/profiles/<name>.json`.

Prints the plan table with predicted per-call times, the predicted iteration time and the
heuristic baselines' times; writes plan.json and timeline.png into --out.

Layering: this CLI is the composition root, the one place in `search` allowed to import `real_jax`
(lazily, inside `main`), to turn the experiment into CallSpecs (`real_jax.plan_inputs`). The
library modules of `search` never import it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time


def load_config(spec: str):
  path, _, arg = spec.partition(":")
  mod_spec = importlib.util.spec_from_file_location("_search_config", path)
  if mod_spec is None or not os.path.exists(path):
    raise SystemExit(f"--config: no config file {path!r}")
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)  # Config files are trusted code (DESIGN.md section 9).
  return mod.get_config(arg or None)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m search", description="Search an execution plan for an experiment.")
  p.add_argument("--config", required=True, help="configs/<exp>.py[:arg]")
  p.add_argument("--profile", default="h100_sxm", help="profile JSON path or name under search/profiles/")
  p.add_argument("--devices", type=int, default=0, help="cluster size (default: one host of the profile)")
  p.add_argument("--out", default="plan_out", help="directory for plan.json and timeline.png")
  p.add_argument("--estimator", default="analytic", choices=("analytic", "auto", "compiled"),
                 help="auto: compile every candidate that fits the local devices (slow on CPU)")
  p.add_argument("--steps", type=int, default=20000, help="MCMC moves")
  p.add_argument("--time-budget", type=float, default=100.0, help="MCMC seconds")
  p.add_argument("--iterations", type=int, default=3)
  p.add_argument("--cache-dir", default=None)
  p.add_argument("--platform", default=None, choices=("gpu", "cpu", "tpu"),
                 help="the accelerator the plan is for (default: this machine's): decides which kernels the "
                 "analytic estimator prices, e.g. gpu: cuDNN attention, and a decode step that reads the filled part of the "
                 "KV cache")
  args = p.parse_args(argv)

  from search.estimator import Estimator
  from search.profile import Profile
  from search.search import Planner
  from search.timeline import draw

  profile = Profile.load(args.profile)
  num_devices = args.devices or profile.devices_per_host
  from real_jax.experiment import experiment_from_config  # Composition root: see module docstring.
  from real_jax.plan_inputs import call_specs
  exp = experiment_from_config(load_config(args.config))
  graph, specs = call_specs(exp, lowerable=args.estimator != "analytic", platform=args.platform)
  est = Estimator(profile, mode=args.estimator, cache_dir=args.cache_dir)
  t0 = time.perf_counter()
  planner = Planner(specs, graph.unroll(args.iterations), est, num_devices)
  res = planner.search(steps=args.steps, time_budget_s=args.time_budget)
  elapsed = time.perf_counter() - t0
  models = {c: s.model for c, s in specs.items()}
  print(res.plan.table(models, res.result.call_seconds))
  print(f"predicted iteration time: {res.result.time:.3f} s ({res.method}, {res.evaluated} plans simulated, "
        f"space {res.space_size:.3g}, {elapsed:.1f} s; reallocation {res.result.realloc_seconds / res.result.iterations:.3f} "
        f"s/iteration; peak memory {res.result.peak_memory.max() / 2**30:.2f} GiB/device)")
  for name, (plan, r) in res.baselines.items():
    speed = r.time / res.result.time if res.result.time > 0 else float("nan")
    print(f"baseline {name:<14} {plan.name:<24} {r.time:.3f} s  (search is {speed:.2f}x){'  ' + r.reason if r.reason else ''}")
  os.makedirs(args.out, exist_ok=True)
  d = res.plan.to_dict()
  d["predicted_s"] = res.result.time
  d["meta"] = {"profile": profile.name, "devices": num_devices, "method": res.method, "search_s": elapsed,
               "call_seconds": res.result.call_seconds,
               "baselines": {k: {"plan": p.to_dict(), "predicted_s": r.time} for k, (p, r) in res.baselines.items()}}
  with open(os.path.join(args.out, "plan.json"), "w") as f:
    json.dump(d, f, indent=2, default=float)
  draw(res.result.events, num_devices, os.path.join(args.out, "timeline.png"),
       title=f"{res.plan.name}: {res.result.time:.3f} s/iteration on {num_devices} x {profile.name}")
  print(f"wrote {args.out}/plan.json and {args.out}/timeline.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())

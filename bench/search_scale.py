"""Planning at paper scale from a profile: PPO with LLaMA actor/critic on 8x8 and 16x8 H100 clusters.

    PYTHONPATH=. python bench/search_scale.py [--budget 100] [--out bench/results/search-scale.json]

Settings after the ReaL paper (arXiv 2406.14088): 512 prompts per iteration, prompt length 128,
up to 896 new tokens, PPO with 8 mini-batches (one epoch), actor and reference of one size, critic
and reward of another (7B+7B, 13B+7B, 34B+7B, 70B+7B). Analytic estimator tier with the h100_cluster
profile; search time is the wall time of candidates + baselines + MCMC on this (2-core) CPU.
"""

import argparse
import json
import platform
import time

import jax

from real_jax.models import get_config
from real_jax.plan_inputs import model_shape
from real_jax.runtime.ppo import ppo_graph
from search import CallSpec, Estimator, Profile
from search.search import Planner


def specs_for(actor: str, critic: str, rows=512, prompt=128, gen=896, mini_batches=8):
  a = model_shape(get_config(actor, dtype="bfloat16"), "lm")
  c = model_shape(get_config(critic, dtype="bfloat16"), "scalar")
  t = prompt + gen
  return {
      "actor_gen": CallSpec("actor_gen", "actor", "generate", rows, a, prompt_len=prompt, new_tokens=gen),
      "reward_inf": CallSpec("reward_inf", "reward", "inference", rows, c, seq_len=t, head="scalar"),
      "ref_inf": CallSpec("ref_inf", "ref", "inference", rows, a, seq_len=t),
      "critic_inf": CallSpec("critic_inf", "critic", "inference", rows, c, seq_len=t, head="scalar"),
      "actor_train": CallSpec("actor_train", "actor", "train_step", rows // mini_batches, a, seq_len=t,
                              trained=True, repeats=mini_batches),
      "critic_train": CallSpec("critic_train", "critic", "train_step", rows // mini_batches, c, seq_len=t,
                               trained=True, head="scalar", repeats=mini_batches),
  }


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--budget", type=float, default=100.0, help="MCMC seconds per setting")
  p.add_argument("--steps", type=int, default=200000)
  p.add_argument("--out", default="bench/results/search-scale.json")
  args = p.parse_args()
  prof = Profile.load("h100_cluster")
  settings = [("7b", "7b", 64), ("13b", "7b", 64), ("34b", "7b", 64), ("70b", "7b", 64),
              ("7b", "7b", 128), ("13b", "7b", 128), ("34b", "7b", 128), ("70b", "7b", 128)]
  rows = []
  for actor, critic, n in settings:
    specs = specs_for(actor, critic)
    t0 = time.perf_counter()
    planner = Planner(specs, ppo_graph(512).unroll(3), Estimator(prof, mode="analytic", cache_dir=""), n)
    res = planner.search(steps=args.steps, time_budget_s=args.budget)
    wall = time.perf_counter() - t0
    row = {"actor": actor, "critic": critic, "gpus": n, "search_s": round(wall, 1), "method": res.method,
           "plans_simulated": res.evaluated, "space": f"{res.space_size:.3g}",
           "predicted_iteration_s": round(res.result.time, 3), "plan": res.plan.to_text(),
           "call_seconds": {k: round(v, 3) for k, v in res.result.call_seconds.items()},
           "realloc_s_per_iteration": round(res.result.realloc_seconds / res.result.iterations, 3),
           "peak_memory_gib": round(float(res.result.peak_memory.max()) / 2**30, 1), "baselines": {}}
    for name, (plan, r) in res.baselines.items():
      row["baselines"][name] = {"plan": plan.to_text(), "predicted_iteration_s": round(r.time, 3),
                                "speedup": round(r.time / res.result.time, 2)}
    print(json.dumps({k: row[k] for k in ("actor", "critic", "gpus", "search_s", "predicted_iteration_s")}),
          {k: v["speedup"] for k, v in row["baselines"].items()}, flush=True)
    rows.append(row)
  out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()} CPU, "
         f"shared 2 cores", "jax": jax.__version__, "profile": prof.name, "estimator": "analytic (uncalibrated "
         "factors = 1)", "iterations_simulated": 3, "mcmc_budget_s": args.budget,
         "host_offload": "a plan that does not fit is scored again with frozen models resting in host memory "
         "(searched plan and baselines; search/README.md, Search)", "host_bandwidth": prof.host_bandwidth,
         "plans_simulated": "simulations run (a plan that does not fit is simulated once more per offload set)",
         "results": rows}
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()

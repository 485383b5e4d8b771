"""Host offload through the engine on the machine at hand: PPO with tiny models on one device, 3 iterations,
once as is and once with the reference and reward resting in pinned host memory (`offload=ref+reward`).

    OUT=/tmp/offload PYTHONPATH=$PWD python bench/offload_check.py

Prints both runs' metrics and the memory kind of each model's parameters after every iteration, then whether
the metrics are identical and the resting models were in `pinned_host` after each iteration. A functional
check of the GPU path (the CPU tests run the same code on the CPU backend's pinned_host); not a timing.
Result of 2026-11-27 on one H200: bench/results/offload-check-h200.json.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import jax  # noqa: E402
from ppo_bench import experiment_dict  # noqa: E402

from real_jax.experiment import experiment_from_config  # noqa: E402
from real_jax.runtime import run  # noqa: E402

calls = ["actor_gen", "reward_inf", "ref_inf", "critic_inf", "actor_train", "critic_train"]
base = ", ".join(f"{c}=0:1/d1f1t1" for c in calls)
out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
for name, plan in (("plain", base), ("offload", base + ", offload=ref+reward")):
  d = experiment_dict("tiny", 8, plan=plan)
  d["num_iterations"] = 3
  seen = []

  def probe(it, metrics, state, seen=seen):
    seen.append({m: sorted({x.sharding.memory_kind for x in jax.tree.leaves(state.engine.slots[m].params)})
                 for m in ("ref", "reward", "actor")})
  t = time.perf_counter()
  rows = run(experiment_from_config(d), os.path.join(os.environ["OUT"], name), log=lambda *_: None, callbacks=[probe])
  out[name] = {"wall_s": time.perf_counter() - t, "kinds": seen,
               "metrics": [{k: r[k] for k in ("reward", "kl", "actor/loss", "critic/loss") if k in r} for r in rows]}
print(json.dumps(out, indent=1))
ok = len(out["plain"]["metrics"]) == 3 and out["plain"]["metrics"] == out["offload"]["metrics"]
rest = len(out["offload"]["kinds"]) == 3 and all(s["ref"] == ["pinned_host"] and s["reward"] == ["pinned_host"]
                                                 for s in out["offload"]["kinds"])
print("metrics identical:", ok, "| resting after each iteration:", rest)
sys.exit(0 if ok and rest else 1)

"""bench/vs_trl.py without TRL: the real_jax half at toy sizes, the exported weights, the record schema."""

import dataclasses
import json
import os

import jax
import numpy as np
from flax import nnx

from bench import vs_trl
from real_jax.models import create_model, get_config, load_pretrained
from sharding import DeviceMesh, Layout, Strategy


def _spec(tmp_path, algorithm="grpo"):
  a = vs_trl.parse_args(["--smoke", "--workdir", str(tmp_path)])
  a.grpo_prompts, a.micro_rows = 8, 1  # Prompts and rows divide over the 8 fake devices.
  return vs_trl.make_spec(a, algorithm, "qwen2.5-0.5b", gpus=jax.device_count())


def test_real_jax_half_runs_full_length_and_splits_phases(tmp_path):
  spec = _spec(tmp_path)
  res = vs_trl.run_real_jax(spec)
  assert "error" not in res, res.get("error")
  its = res["iterations"]
  assert len(its) == spec.warmup + spec.iterations
  phases = ("generation_s", "inference_s", "training_s", "realloc_s")
  for it in its:
    assert it["response_len"] == spec.response_len  # ignore_eos: every response is full length.
    assert it["generation_s"] > 0 and all(it[k] >= 0 for k in phases)
    assert sum(it[k] for k in phases) <= it["iteration_s"] + 1e-6
  # A call's end is stamped by a watcher thread when its outputs are ready; on a loaded CPU a later
  # call's watcher can stamp first, and the split then gives that call 0 s in that iteration (seen in
  # CI for both inference calls of one iteration). Over all iterations every phase has time.
  assert all(sum(it[k] for it in its) > 0 for k in ("generation_s", "inference_s", "training_s"))
  assert res["plan"] == f"colocated d{spec.gpus}f1t1m{spec.rows // spec.gpus}"
  # The exported checkpoints are the run's initial weights: the policy as real_jax creates it under the
  # run's colocated layout, and the reward model likewise.
  preset, overrides = spec.model_config()
  cfg = get_config(preset, **overrides)
  layout = Layout(DeviceMesh(0, jax.device_count()), Strategy(data=jax.device_count()))
  for path, seed, head in ((spec.policy_dir, 0, "lm"), (spec.reward_dir, vs_trl.REWARD_SEED, "scalar")):
    ours = nnx.state(create_model(cfg, layout, seed=seed, head=head))
    loaded = nnx.state(load_pretrained(path, layout=layout, dtype="float32"))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(loaded), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with open(os.path.join(spec.tokenizer_dir, "tokenizer_config.json")) as f:
    assert json.load(f)["eos_token"] == "</s>"
  with open(spec.prompts_path) as f:
    assert len(json.loads(f.readline())["prompt"].split()) == spec.prompt_len


def test_phase_split_counts_time_not_overlapped_by_earlier_calls():
  recs = [{"name": "actor_gen", "kind": "call", "start": 0.0, "end": 5.0},
          {"name": "ref_inf", "kind": "call", "start": 0.1, "end": 6.0},  # queued behind generation
          {"name": "reward_inf", "kind": "call", "start": 0.2, "end": 7.5},
          {"name": "actor_train", "kind": "call", "start": 7.6, "end": 9.0}]
  s = vs_trl.phase_split(recs, 10.0)
  assert s["generation_s"] == 5.0 and s["inference_s"] == 2.5 and abs(s["training_s"] - 1.4) < 1e-9
  assert abs(s["other_s"] - 1.1) < 1e-9


def test_records_merge_by_key_and_keep_the_schema(tmp_path):
  a = vs_trl.parse_args(["--smoke", "--workdir", str(tmp_path), "--out", str(tmp_path / "r.json")])
  spec = vs_trl.make_spec(a, "ppo", "tiny-4l", gpus=1)
  orch = vs_trl.Orchestrator(a)
  rj = {"system": "real_jax", "warmup": 1, "iterations": [
      {"iteration_s": 9.0, "generation_s": 5, "inference_s": 1, "training_s": 2, "realloc_s": 0, "other_s": 1},
      {"iteration_s": 2.0, "generation_s": 1, "inference_s": 0.5, "training_s": 0.5, "realloc_s": 0, "other_s": 0}]}
  trl = {"system": "trl", "warmup": 1, "iterations": [
      {"iteration_s": 9.0, "generation_s": 6, "inference_s": 1, "training_s": 2},
      {"iteration_s": 8.0, "generation_s": 6, "inference_s": 1, "training_s": 1}]}
  common = {"algorithm": "ppo", "model": "tiny-4l", "gpus": 1}
  rec = orch.record(common, rj, trl, True, spec)
  assert rec["real_jax_tokens_per_s"] == spec.tokens_per_iteration / 2.0
  assert rec["trl_tokens_per_s"] == spec.tokens_per_iteration / 8.0 and rec["speedup"] == 4.0
  assert rec["trl"]["version"] == vs_trl.TRL_VERSIONS["ppo"] and rec["trl"]["phases_s"]["generation_s"] == 6
  orch.put(rec)
  orch.put({**rec, "speedup": 5.0})  # Same key: replaced.
  orch.put(orch.record(common, rj, {"error": "not run: the --budget was spent"}, False, spec))
  doc = json.loads((tmp_path / "r.json").read_text())
  assert {"card", "date", "records"} <= set(doc)
  assert [(r["trl_gradient_checkpointing"], r["speedup"]) for r in doc["records"]] == [(True, 5.0), (False, None)]
  assert doc["records"][1]["trl_tokens_per_s"] is None and doc["records"][1]["trl"]["error"].startswith("not run")


def test_assemble_rebuilds_records_from_worker_files(tmp_path):
  run = tmp_path / "run"
  a = vs_trl.parse_args(["--smoke", "--workdir", str(run)])
  spec = vs_trl.make_spec(a, "grpo", "tiny-4l", gpus=1)
  tag = "grpo-tiny-4l-1gpu"
  (run / f"spec-{tag}.json").write_text(json.dumps(dataclasses.asdict(spec)))
  its = lambda t: [{"iteration_s": 9.0, "generation_s": 5.0}, {"iteration_s": t, "generation_s": t / 2}]  # noqa: E731
  dev = "NVIDIA H100 80GB HBM3"
  (run / f"real_jax-{tag}.json").write_text(json.dumps({"system": "real_jax", "jax": "0.x", "device": dev,
                                                        "warmup": 1, "iterations": its(1.0)}))
  (run / f"trl-{tag}-gc1.json").write_text(json.dumps({"system": "trl", "device": dev, "warmup": 1,
                                                       "iterations": its(4.0)}))
  (run / "logs").mkdir(exist_ok=True)
  (run / "logs" / f"trl-{tag}-gc0.log").write_text("Traceback ...\n")  # Ran, left no JSON.
  out = tmp_path / "vs_trl-h100.json"
  vs_trl.main(["--assemble", str(run), "--out", str(out), "--note", "shared host"])
  doc = json.loads(out.read_text())
  assert (doc["card"], doc["device_kind"], doc["jax"]) == ("h100", dev, "0.x") and len(doc["date"]) == 10
  recs = {r["trl_gradient_checkpointing"]: r for r in doc["records"]}
  assert recs[True]["speedup"] == 4.0 and recs[True]["note"] == "shared host"
  assert recs[True]["real_jax_tokens_per_s"] == spec.tokens_per_iteration / 1.0
  assert recs[False]["trl_tokens_per_s"] is None and recs[False]["trl"]["error"].startswith("failed")

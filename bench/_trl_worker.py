r"""The TRL side of `bench/vs_trl.py`: one TRL training run, timed by phase (torch; no JAX).

    python bench/_trl_worker.py --spec SPEC.json --out RESULT.json --gradient-checkpointing 1
    python -m accelerate.commands.launch --num_processes 4 --multi_gpu bench/_trl_worker.py ...   # DDP

`bench/vs_trl.py` starts it with PYTHONPATH holding the pinned TRL (GRPO: the current release's
`GRPOTrainer`; PPO: `trl.experimental.ppo.PPOTrainer` of the last release that ships one) and reads
the JSON it writes (rank 0 only). The spec (written by vs_trl.py) names the exported HF checkpoints
(policy, reward), the tokenizer, the prompts and every size.

Timing. Every timer synchronises the device before and after. The iteration time is the time between
consecutive `on_step_end` callbacks (one optimizer step per iteration; the first iteration starts at
`on_train_begin`). Phases inside an iteration:
* generation: GRPO `GRPOTrainer._generate` (prompt tokenisation, HF `generate`, EOS masking, decoding);
  PPO the module-level `batch_generation` that `PPOTrainer.train` calls (HF `generate` with scores);
* inference: GRPO `_get_per_token_logps_and_entropies` while gradients are off (reference log-probs)
  and `_calculate_rewards` (decode, re-tokenise, reward model); PPO `forward` (reference) and
  `get_reward` (value and reward models) while gradients are off;
* training: the rest of the iteration (forward/backward/optimizer steps and TRL's own per-step work).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback


def _settings(obj, keys):
  return {k: getattr(obj, k) for k in keys if hasattr(obj, k)}


class PhaseTimer:
  """Per-iteration phase accumulators, closed at every `on_step_end`."""

  def __init__(self, torch, device_type: str):
    self.torch, self.device_type = torch, device_type
    self.acc: dict[str, float] = {}
    self.marks: list[float] = []
    self.steps: list[dict] = []
    self.logs: list[dict] = []
    self.response_lens: list[int] = []

  def sync(self):
    if self.device_type == "cuda":
      self.torch.cuda.synchronize()

  def wrap(self, phase: str, fn, *, only_without_grad: bool = False, autocast=None):
    """`fn` timed into `phase` (when gradients are off, if only_without_grad), optionally under `autocast`."""

    def timed(*args, **kwargs):
      if only_without_grad and self.torch.is_grad_enabled():
        return fn(*args, **kwargs)
      self.sync()
      t = time.perf_counter()
      with autocast() if autocast else contextlib.nullcontext():
        out = fn(*args, **kwargs)
      self.sync()
      self.acc[phase] = self.acc.get(phase, 0.0) + time.perf_counter() - t
      return out

    return timed

  def begin(self):
    self.sync()
    self.marks.append(time.perf_counter())

  def step_end(self):
    self.sync()
    now = time.perf_counter()
    it = now - self.marks[-1]
    self.marks.append(now)
    gen, inf = self.acc.get("generation", 0.0), self.acc.get("inference", 0.0)
    self.steps.append({"iteration_s": it, "generation_s": gen, "inference_s": inf,
                       "training_s": it - gen - inf})
    self.acc = {}


def make_callback(timer: PhaseTimer):
  from transformers import TrainerCallback

  class _Timing(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
      timer.begin()

    def on_step_end(self, args, state, control, **kwargs):
      timer.step_end()

    def on_log(self, args, state, control, logs=None, **kwargs):
      if logs:
        timer.logs.append({k: v for k, v in logs.items() if isinstance(v, (int, float))})

  return _Timing()


def load_tokenizer(spec):
  from transformers import PreTrainedTokenizerFast
  tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(spec["tokenizer_dir"], "tokenizer.json"),
                                pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
  tok.padding_side = "left"
  return tok


def prompts(spec) -> list[str]:
  with open(spec["prompts_path"]) as f:
    return [json.loads(line)["prompt"] for line in f if line.strip()]


def common_args(spec, gc: bool, cpu: bool, world: int, out_dir: str) -> dict:
  local_rows = spec["rows"] // world
  if local_rows % spec["micro_rows"]:
    raise ValueError(f"rows per process {local_rows} not divisible by micro_rows={spec['micro_rows']}")
  return dict(output_dir=out_dir, per_device_train_batch_size=spec["micro_rows"],
              gradient_accumulation_steps=local_rows // spec["micro_rows"], learning_rate=spec["lr"],
              lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
              gradient_checkpointing=gc, bf16=True, use_cpu=cpu, seed=spec["seed"], report_to="none",
              save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)


def run_grpo(spec, gc: bool, cpu: bool, world: int, out_dir: str, timer: PhaseTimer):
  import datasets
  import trl
  from trl import GRPOConfig, GRPOTrainer

  tok = load_tokenizer(spec)
  ds = datasets.Dataset.from_dict({"prompt": prompts(spec)})
  steps = spec["warmup"] + spec["iterations"]
  args = GRPOConfig(**common_args(spec, gc, cpu, world, out_dir), max_steps=steps,
                    num_generations=spec["group_size"], max_completion_length=spec["response_len"],
                    temperature=spec["temperature"], top_p=1.0, top_k=0, beta=spec["beta"], loss_type="grpo",
                    scale_rewards="group", num_iterations=1, epsilon=0.2, use_vllm=False,
                    generation_kwargs={"min_new_tokens": spec["response_len"]})  # no early EOS
  trainer = GRPOTrainer(model=spec["policy_dir"], reward_funcs=spec["reward_dir"], args=args, train_dataset=ds,
                        processing_class=tok, reward_processing_classes=tok, callbacks=[make_callback(timer)])
  trainer._generate = timer.wrap("generation", trainer._generate)
  trainer._calculate_rewards = timer.wrap("inference", trainer._calculate_rewards)
  trainer._get_per_token_logps_and_entropies = timer.wrap(
      "inference", trainer._get_per_token_logps_and_entropies, only_without_grad=True)
  trainer.train()
  keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
          "generation_batch_size", "num_generations", "max_completion_length", "beta", "loss_type",
          "scale_rewards", "num_iterations", "temperature", "top_p", "top_k", "learning_rate", "bf16",
          "gradient_checkpointing", "generation_kwargs", "use_vllm", "max_steps")
  return {"trainer": "trl.GRPOTrainer", "trl": trl.__version__, "settings": _settings(trainer.args, keys),
          "models": "policy and reference fp32 weights (TRL's default dtype) under accelerate's bf16 autocast; "
                    "reward model (AutoModelForSequenceClassification, num_labels=1) likewise"}


def run_ppo(spec, gc: bool, cpu: bool, world: int, out_dir: str, timer: PhaseTimer):
  import datasets
  import torch
  import trl
  import trl.experimental.ppo.ppo_trainer as ppo_mod
  from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
  from trl.experimental.ppo import PPOConfig, PPOTrainer

  tok = load_tokenizer(spec)
  ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts(spec)]
  if any(len(x) != spec["prompt_len"] for x in ids):
    raise ValueError(f"prompts do not tokenise to {spec['prompt_len']} tokens")
  ds = datasets.Dataset.from_dict({"input_ids": ids})
  steps = spec["warmup"] + spec["iterations"]
  local_rows = spec["rows"] // world
  args = PPOConfig(**common_args(spec, gc, cpu, world, out_dir), total_episodes=spec["rows"] * steps,
                   num_ppo_epochs=1, num_mini_batches=1, local_rollout_forward_batch_size=local_rows,
                   response_length=spec["response_len"], stop_token=None, stop_token_id=None,
                   missing_eos_penalty=None, temperature=spec["temperature"], kl_coef=spec["kl_coef"],
                   kl_estimator="k1", whiten_rewards=False, cliprange=0.2, cliprange_value=0.2, gamma=1.0,
                   lam=0.95, num_sample_generations=0)
  f32 = dict(dtype=torch.float32)
  policy = AutoModelForCausalLM.from_pretrained(spec["policy_dir"], **f32)
  ref = AutoModelForCausalLM.from_pretrained(spec["policy_dir"], **f32)
  reward = AutoModelForSequenceClassification.from_pretrained(spec["reward_dir"], num_labels=1, **f32)
  value = AutoModelForSequenceClassification.from_pretrained(spec["reward_dir"], num_labels=1, **f32)
  for m in (policy, ref):  # No EOS ends a response (stop_token=None also clears the policy's).
    m.generation_config.eos_token_id = None
  trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                       train_dataset=ds, value_model=value, eval_dataset=ds.select(range(min(len(ds), 4))),
                       callbacks=[make_callback(timer)])
  # PPOTrainer.train rolls out with the unwrapped policy and the plain ref / reward / value models, outside
  # accelerate's autocast (i.e. in fp32); the rollout calls run here under bf16 autocast, as its training
  # forward does, so both systems compute in bf16 with fp32 weights.
  device_type = "cpu" if cpu else "cuda"
  bf16 = lambda: torch.autocast(device_type, dtype=torch.bfloat16)  # noqa: E731
  generate = ppo_mod.batch_generation

  def generate_and_count(model, queries, *args, **kwargs):
    out = generate(model, queries, *args, **kwargs)
    timer.response_lens.append(int(out[0].shape[1] - queries.shape[1]))
    return out

  ppo_mod.batch_generation = timer.wrap("generation", generate_and_count, autocast=bf16)
  ppo_mod.forward = timer.wrap("inference", ppo_mod.forward, only_without_grad=True, autocast=bf16)
  ppo_mod.get_reward = timer.wrap("inference", ppo_mod.get_reward, only_without_grad=True, autocast=bf16)
  trainer.train()
  keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "local_rollout_forward_batch_size",
          "num_ppo_epochs", "num_mini_batches", "batch_size", "local_batch_size", "total_episodes",
          "response_length", "stop_token", "stop_token_id", "temperature", "kl_coef", "kl_estimator", "cliprange",
          "cliprange_value", "vf_coef", "gamma", "lam", "learning_rate", "bf16", "gradient_checkpointing")
  return {"trainer": "trl.experimental.ppo.PPOTrainer", "trl": trl.__version__,
          "settings": _settings(trainer.args, keys),
          "models": "policy, reference, reward and value fp32 weights; training under accelerate's bf16 autocast, "
                    "rollout (generation, reference, value, reward) under torch.autocast(bf16) added by the bench"}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--spec", required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--gradient-checkpointing", type=int, choices=(0, 1), required=True)
  a = ap.parse_args()
  with open(a.spec) as f:
    spec = json.load(f)
  import accelerate
  import torch
  import transformers

  cpu = not torch.cuda.is_available()
  world = int(os.environ.get("WORLD_SIZE", "1"))
  rank = int(os.environ.get("RANK", "0"))
  timer = PhaseTimer(torch, "cpu" if cpu else "cuda")
  out_dir = os.path.join(os.path.dirname(os.path.abspath(a.out)), f"trl_out_{os.getpid()}")
  result = {"system": "trl", "algorithm": spec["algorithm"], "gradient_checkpointing": bool(a.gradient_checkpointing),
            "processes": world, "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "device": "cpu" if cpu else torch.cuda.get_device_name(0)}
  t0 = time.perf_counter()
  try:
    run = {"grpo": run_grpo, "ppo": run_ppo}[spec["algorithm"]]
    result.update(run(spec, bool(a.gradient_checkpointing), cpu, world, out_dir, timer))
  except Exception as e:  # noqa: BLE001  (reported in the JSON; the orchestrator goes on)
    traceback.print_exc()
    result["error"] = f"{type(e).__name__}: {str(e)[:400]}"
  result["wall_s"] = time.perf_counter() - t0
  result["iterations"] = timer.steps
  result["warmup"] = spec["warmup"]
  lengths = [r["completions/mean_length"] for r in timer.logs if "completions/mean_length" in r]
  if lengths or timer.response_lens:
    result["response_len"] = lengths[-1] if lengths else timer.response_lens[-1]
  if torch.cuda.is_available():
    result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
  if rank == 0:
    with open(a.out, "w") as f:
      json.dump(result, f, indent=1, default=str)
  print(json.dumps({k: v for k, v in result.items() if k != "iterations"}, default=str)[:2000], flush=True)
  sys.exit(1 if "error" in result else 0)


if __name__ == "__main__":
  main()

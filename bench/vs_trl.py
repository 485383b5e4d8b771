r"""real_jax against TRL on the same GPUs: GRPO and PPO iteration time by phase, and tokens/s (issue 8 item 3).

    PYTHONPATH=$PWD python bench/vs_trl.py --gpus 1 --budget 450          # 1 GPU (device 0)
    PYTHONPATH=$PWD python bench/vs_trl.py --gpus 4 --budget 450          # 4 GPUs (TRL: accelerate launch, DDP)
    PYTHONPATH=$PWD .venv/bin/python bench/vs_trl.py --smoke --trl-python .venv_trl/bin/python   # CPU
    PYTHONPATH=$PWD .venv/bin/python bench/vs_trl.py --assemble /tmp/vs_trl --out F  # records from worker files

Both systems start from the same random-init LLaMA-shaped weights: real_jax creates them (`create_model`
with fixed seeds) and exports them with `save_pretrained` (fp32) for TRL. Models: "tiny-4l" (4 layers,
d_model 512, vocab 32000) and "qwen2.5-0.5b" (the Qwen2.5-0.5B shape). Per iteration: `--prompts`
prompts of `--prompt-len` random word tokens (one `tokenizer.json` shared by both sides), responses of
`--response-len` tokens forced to full length (real_jax `config.sampling.ignore_eos`; TRL GRPO
`min_new_tokens`, TRL PPO no stop token), bf16 compute with fp32 weights on both sides, one optimizer
step per trained model per iteration, a sequence-classification reward model (random init, same weights)
on both sides, a reference model on both sides (GRPO beta > 0, PPO KL in the reward).

* GRPO: `trl.GRPOTrainer` of the current TRL (HF generate, no vLLM) vs real_jax GRPO, group size `--group-size`.
* PPO: `trl.experimental.ppo.PPOTrainer` of TRL 1.12.0, the last release that ships a PPO trainer (1.13.0
  removed it), vs real_jax PPO; the critic / value model starts from the reward model's weights on both sides.
* TRL runs twice per record pair: gradient checkpointing on (TRL's default) and off.

real_jax plan: colocated on all `--gpus` devices, `d<gpus>f1t1m<k>` (pure data parallel, like TRL's DDP),
with k micro-batches so that a train / inference micro-batch holds `--micro-rows` rows per device (TRL:
`per_device_train_batch_size = --micro-rows`). Each system runs in its own subprocess (JAX and torch never
share a GPU): real_jax with this interpreter, TRL with `--trl-python` and PYTHONPATH set to a `--target`
install of the pinned wheels in `.whl/vs_trl/{common,grpo,ppo}` (see bench/README.md, vs_trl).

Timing: `--warmup` iterations (compilation, allocator warm-up), then `--iterations` timed ones; every
number is the mean over the timed iterations. tokens/s = rows x (prompt + response tokens) / iteration
time. Phases: real_jax from its `timeline.jsonl` (each call's time on the devices not overlapped by the
calls dispatched before it: calls on one mesh run in dispatch order), TRL from timers in `_trl_worker.py`.
Output: `bench/results/vs_trl-<card>.json` (or `--out`), rewritten after every record; records of an
existing file with other keys (algorithm, model, gpus, gradient checkpointing) are kept, so the 1-GPU
and 4-GPU runs land in one file. `--budget`: no system run starts after that many seconds, and every
run is killed at budget + `--grace`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS = os.path.join(REPO, ".whl", "vs_trl")
TRL_VERSIONS = {"grpo": "1.16.0", "ppo": "1.12.0"}
REWARD_SEED = 2  # The reward model's (and the PPO critic's) init seed; the policy's is 0.
SPECIAL = {"pad_token_id": 0, "eos_token_id": 1}  # <pad>, </s>; <unk> is 2; word i is "w<i>".
FIRST_WORD = 3

# name -> (preset, overrides); bf16 compute with fp32 master weights is added for every model.
MODELS = {
    "tiny-4l": ("tiny", dict(vocab_size=32000, d_model=512, n_layers=4, n_heads=8, n_kv_heads=8, head_dim=64,
                             d_ff=1376, rms_eps=1e-5, max_seq_len=2048)),
    "qwen2.5-0.5b": ("qwen2.5-0.5b", {}),
}
# --smoke: the same families (LLaMA, and Qwen2 with q/k/v biases and tied embeddings) at toy sizes.
SMOKE_MODELS = {
    "tiny-4l": ("tiny", dict(vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
                             rms_eps=1e-5, max_seq_len=64)),
    "qwen2.5-0.5b": ("qwen2.5-0.5b", dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                          head_dim=16, d_ff=128, max_seq_len=64)),
}
PRECISION = dict(dtype="bfloat16", param_dtype="float32")


@dataclasses.dataclass
class Spec:
  """One (algorithm, model, gpus) comparison: what both workers read (as JSON)."""

  algorithm: str
  model: str
  gpus: int
  prompts: int
  group_size: int
  prompt_len: int
  response_len: int
  warmup: int
  iterations: int
  micro_rows: int
  lr: float
  beta: float
  kl_coef: float
  temperature: float
  seed: int
  smoke: bool
  policy_dir: str
  reward_dir: str
  tokenizer_dir: str
  prompts_path: str
  workdir: str
  rows: int = 0

  def __post_init__(self):
    self.rows = self.prompts * self.group_size
    if self.prompts % self.gpus:
      raise ValueError(f"{self.algorithm}: {self.prompts} prompts per iteration do not divide over {self.gpus} GPUs")
    if self.rows % (self.gpus * self.micro_rows):
      raise ValueError(f"{self.algorithm}: {self.rows} rows per iteration do not divide into {self.gpus} GPUs x "
                       f"--micro-rows {self.micro_rows}")

  @property
  def tokens_per_iteration(self) -> int:
    return self.rows * (self.prompt_len + self.response_len)

  def model_config(self):
    preset, overrides = (SMOKE_MODELS if self.smoke else MODELS)[self.model]
    return preset, {**overrides, **PRECISION}


# -- data: one tokenizer and one prompt file per model, shared by both systems -----------------------


def make_tokenizer(directory: str, vocab_size: int) -> None:
  """A word-level `tokenizer.json` ("w<i>" -> i, whitespace split) with <pad>, </s>, <unk> and no BOS."""
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(FIRST_WORD, vocab_size)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>",
               "unk_token": "<unk>", "model_max_length": 1 << 20, "padding_side": "left"}, f, indent=1)


def make_prompts(path: str, n: int, length: int, vocab_size: int, seed: int) -> None:
  """`n` JSON lines {"prompt": "w.. w.. "} of `length` random words (the trailing space keeps TRL's
  prompt + completion text concatenation on word boundaries)."""
  rng = random.Random(seed)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for _ in range(n):
      words = " ".join(f"w{rng.randrange(FIRST_WORD, vocab_size)}" for _ in range(length))
      f.write(json.dumps({"prompt": words + " "}) + "\n")


# -- the real_jax side (runs in its own process) ------------------------------------------------------


def export_models(spec: Spec) -> None:
  """Writes the policy (lm head, seed 0) and reward (scalar head, REWARD_SEED) HF checkpoints, fp32,
  exactly as real_jax initialises them in the run (`create_model` with the same seeds)."""
  import jax

  from real_jax.models import create_model, get_config, save_pretrained
  from sharding import Layout

  preset, overrides = spec.model_config()
  marker = os.path.join(spec.reward_dir, "export.json")
  if os.path.exists(marker) and json.load(open(marker)) == {"preset": preset, "overrides": overrides}:
    return
  cfg = get_config(preset, **overrides)
  for path, seed, head in ((spec.policy_dir, 0, "lm"), (spec.reward_dir, REWARD_SEED, "scalar")):
    model = create_model(cfg, Layout.on(0), seed=seed, head=head)
    save_pretrained(model, path, dtype="float32", extra_config=dict(SPECIAL))
    for name in ("tokenizer.json", "tokenizer_config.json"):
      shutil.copy(os.path.join(spec.tokenizer_dir, name), os.path.join(path, name))
    del model
    jax.clear_caches()
  with open(marker, "w") as f:
    json.dump({"preset": preset, "overrides": overrides}, f)


def real_jax_config(spec: Spec) -> dict:
  """The experiment dict (`real_jax.experiment.experiment_from_config` takes plain dicts)."""
  preset, overrides = spec.model_config()
  def model(head, init, seed):
    return dict(preset=preset, overrides=overrides, head=head, init=init, seed=seed)

  models = {"actor": model("lm", "random", 0), "ref": model("lm", "copy:actor", 0),
            "reward": model("scalar", "random", REWARD_SEED)}
  opt = dict(lr=spec.lr, warmup_steps=0, decay="constant", decay_steps=1, b2=0.999, clip_norm=1.0)
  optim = {"actor": opt}
  if spec.algorithm == "ppo":
    models["critic"] = model("scalar", "random", REWARD_SEED)  # = the reward model's weights (TRL: value model)
    optim["critic"] = opt
  k = spec.rows // (spec.gpus * spec.micro_rows)
  return dict(
      algorithm=spec.algorithm, seed=spec.seed,
      num_iterations=spec.warmup + spec.iterations + 1,  # +1: the last timed one is not the final (no save)
      checkpoint_every=0, sft_warmup_steps=0, log_every=1, models=models, optim=optim,
      data=dict(task="", path=spec.prompts_path, tokenizer=spec.tokenizer_dir, batch_size=spec.prompts,
                max_prompt_len=spec.prompt_len, on_long="reject"),
      sampling=dict(max_new_tokens=spec.response_len, temperature=spec.temperature, top_k=0, top_p=1.0,
                    n_samples=spec.group_size, ignore_eos=True),
      plan="colocated", colocated_strategy=f"d{spec.gpus}f1t1m{k}",
      **({"grpo": dict(group_size=spec.group_size, beta=spec.beta, clip_eps=0.2, kl_estimator="k3",
                       loss_agg="seq_mean_token_mean", scale_by_std=True, ppo_epochs=1, mini_batches=1)}
         if spec.algorithm == "grpo" else
         {"ppo": dict(kl_coef=spec.kl_coef, kl_in_reward=True, kl_estimator="k1", clip_eps=0.2, value_clip_eps=0.2,
                      gamma=1.0, lam=0.95, whiten_advantages=True, ppo_epochs=1, mini_batches=1)}))


PHASES = {"actor_gen": "generation", "ref_inf": "inference", "reward_inf": "inference", "critic_inf": "inference",
          "actor_train": "training", "critic_train": "training"}


def phase_split(records: list[dict], iteration_s: float) -> dict[str, float]:
  """Seconds per phase of one iteration from its timeline records: each call's or reallocation's end
  minus the later of its dispatch and the previous record's end (one mesh runs in dispatch order)."""
  out = {"generation_s": 0.0, "inference_s": 0.0, "training_s": 0.0, "realloc_s": 0.0}
  busy = None
  for r in sorted(records, key=lambda r: r["start"]):
    end = r["end"] if r["end"] is not None else r["start"]
    start = r["start"] if busy is None else max(r["start"], busy)
    busy = end if busy is None else max(busy, end)
    if r["kind"] == "realloc":
      out["realloc_s"] += max(0.0, end - start)
    elif r["kind"] == "call":
      out[PHASES.get(r["name"], "training") + "_s"] += max(0.0, end - start)
  out["iteration_s"] = iteration_s
  out["other_s"] = iteration_s - sum(v for k, v in out.items() if k != "iteration_s")
  return out


def run_real_jax(spec: Spec) -> dict:
  """Exports the models (once), runs real_jax's `run` for warmup + timed iterations, returns the
  per-iteration phase split (an "error" key instead when something failed)."""
  import jax

  from real_jax.experiment import experiment_from_config
  from real_jax.runtime import run

  result = {"system": "real_jax", "jax": jax.__version__, "device": jax.devices()[0].device_kind,
            "devices": jax.device_count()}
  t0 = time.perf_counter()
  try:
    if jax.device_count() != spec.gpus:
      raise ValueError(f"real_jax sees {jax.device_count()} devices, the spec asks for {spec.gpus}")
    export_models(spec)
    result["export_s"] = time.perf_counter() - t0
    config = real_jax_config(spec)
    result["plan"] = f"{config['plan']} {config['colocated_strategy']}"
    exp = experiment_from_config(config)
    workdir = os.path.join(spec.workdir, f"real_jax-{spec.algorithm}-{spec.model}-{spec.gpus}")
    shutil.rmtree(workdir, ignore_errors=True)  # A workdir with a checkpoint would resume.
    rows = []
    last = spec.warmup + spec.iterations - 1

    class _Done(Exception):
      pass

    def stop_after_timed(it, metrics, state):
      rows.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
      if it == last:
        raise _Done  # Before the final iteration's checkpoint save.

    t_run = time.perf_counter()
    try:
      run(exp, workdir, log=lambda m: print(m, flush=True), progress=False, callbacks=[stop_after_timed])
    except _Done:
      pass
    result["run_s"] = time.perf_counter() - t_run
    with open(os.path.join(workdir, "timeline.jsonl")) as f:
      timeline = {row["iteration"]: row["records"] for row in map(json.loads, f)}
    its = []
    for row in rows:
      it = int(row["iteration"])
      split = phase_split(timeline.get(it, []), row["time/iteration"])
      split.update(iteration=it, response_len=row.get("response_len"), reward=row.get("reward"), kl=row.get("kl"))
      its.append(split)
    result["iterations"] = its
    result["response_len"] = its[-1]["response_len"] if its else None
  except Exception as e:  # noqa: BLE001  (reported in the JSON; the orchestrator goes on)
    import traceback
    traceback.print_exc()
    result["error"] = f"{type(e).__name__}: {str(e)[:400]}"
  result["wall_s"] = time.perf_counter() - t0
  result["warmup"] = spec.warmup
  stats = [d.memory_stats() or {} for d in jax.local_devices()]
  if any("peak_bytes_in_use" in m for m in stats):
    result["peak_memory_bytes"] = max(m.get("peak_bytes_in_use", 0) for m in stats)
  return result


def real_jax_worker(spec: Spec, out_path: str) -> None:
  result = run_real_jax(spec)
  with open(out_path, "w") as f:
    json.dump(result, f, indent=1)
  sys.exit(1 if "error" in result else 0)


# -- the orchestrator --------------------------------------------------------------------------------


def card_name() -> tuple[str, str]:
  """(short card name, full name) from nvidia-smi, without touching the GPU from this process."""
  try:
    name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                          text=True, timeout=30, check=True).stdout.splitlines()[0].strip()
  except (OSError, subprocess.SubprocessError, IndexError):
    return "cpu", "cpu"
  return short_card(name), name


def short_card(name: str) -> str:
  for c in ("h100", "h200", "a100", "b200"):
    if c in name.lower():
      return c
  return name.lower().replace(" ", "_")


def timed_mean(result: dict | None) -> dict | None:
  """Mean of each phase over the timed iterations (those after the warm-up)."""
  if not result or result.get("error"):
    return None
  its = result.get("iterations", [])[result.get("warmup", 0):]
  if not its:
    return None
  keys = [k for k in its[0] if k.endswith("_s")]
  return {k: sum(i[k] for i in its) / len(its) for k in keys}


def make_spec(a, algorithm: str, model: str, gpus: int) -> Spec:
  """The Spec of one comparison from the command-line settings `a`; writes the model's tokenizer and
  prompt file into `a.workdir` when missing."""
  preset, overrides = (SMOKE_MODELS if a.smoke else MODELS)[model]
  from real_jax.models import get_config  # Pure Python (dataclasses): does not start JAX.
  vocab = get_config(preset, **overrides).vocab_size
  root = os.path.join(a.workdir, "models", f"{model}{'-smoke' if a.smoke else ''}")
  tok_dir = os.path.join(root, "tokenizer")
  if not os.path.exists(os.path.join(tok_dir, "tokenizer_config.json")):
    make_tokenizer(tok_dir, vocab)
  grpo = algorithm == "grpo"
  prompts = a.grpo_prompts if grpo else a.ppo_prompts
  n = prompts * (a.warmup + a.iterations + 1)
  path = os.path.join(root, f"prompts-{n}x{a.prompt_len}.jsonl")
  if not os.path.exists(path):
    make_prompts(path, n, a.prompt_len, vocab, seed=a.seed)
  return Spec(algorithm=algorithm, model=model, gpus=gpus, prompts=prompts, group_size=a.group_size if grpo else 1,
              prompt_len=a.prompt_len, response_len=a.response_len, warmup=a.warmup, iterations=a.iterations,
              micro_rows=a.micro_rows, lr=a.lr, beta=a.beta, kl_coef=a.kl_coef, temperature=1.0, seed=a.seed,
              smoke=a.smoke, policy_dir=os.path.join(root, "policy"), reward_dir=os.path.join(root, "reward"),
              tokenizer_dir=tok_dir, prompts_path=path, workdir=a.workdir)


def common_fields(spec: Spec) -> dict:
  """The record fields that describe the comparison itself (sizes and iteration counts)."""
  return {"algorithm": spec.algorithm, "model": spec.model, "gpus": spec.gpus, "prompts_per_iteration": spec.prompts,
          "group_size": spec.group_size, "rows_per_iteration": spec.rows, "prompt_len": spec.prompt_len,
          "response_len": spec.response_len, "tokens_per_iteration": spec.tokens_per_iteration,
          "warmup_iterations": spec.warmup, "timed_iterations": spec.iterations, "micro_rows": spec.micro_rows}


class Orchestrator:
  def __init__(self, args, card: tuple[str, str] | None = None, date: str | None = None):
    self.args = args
    self.t0 = time.perf_counter()
    self.card, self.card_full = card or (("cpu", "cpu") if args.smoke else card_name())
    self.out = args.out or os.path.join(REPO, "bench", "results", f"vs_trl-{self.card}.json")
    self.doc = {"card": self.card, "device_kind": self.card_full, "date": date or datetime.date.today().isoformat(),
                "jax": None, "records": []}
    if os.path.exists(self.out) and not args.fresh:
      with open(self.out) as f:
        old = json.load(f)
      self.doc["records"] = old.get("records", [])
      self.doc["jax"] = old.get("jax")
    self.logs = os.path.join(args.workdir, "logs")

  def elapsed(self) -> float:
    return time.perf_counter() - self.t0

  def left(self) -> float:
    return self.args.budget - self.elapsed()

  def write(self) -> None:
    paths = [self.out] + ([os.path.join(self.args.mirror, os.path.basename(self.out))] if self.args.mirror else [])
    for path in paths:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      with open(path + ".tmp", "w") as f:
        json.dump(self.doc, f, indent=1, default=str)
      os.replace(path + ".tmp", path)

  def put(self, record: dict) -> None:
    key = lambda r: (r["algorithm"], r["model"], r["gpus"], r["trl_gradient_checkpointing"],  # noqa: E731
                     r.get("micro_rows", 8))
    self.doc["records"] = [r for r in self.doc["records"] if key(r) != key(record)] + [record]
    self.doc["jax"] = record["real_jax"].get("jax") or self.doc.get("jax")
    self.write()

  # -- subprocesses --

  def launch(self, name: str, cmd: list[str], env: dict) -> tuple[int, float]:
    """Runs cmd (own process group, killed at budget + grace); returns (exit code, seconds)."""
    os.makedirs(self.logs, exist_ok=True)
    log = os.path.join(self.logs, f"{name}.log")
    limit = max(10.0, self.left() + self.args.grace)
    t = time.perf_counter()
    print(f"[vs_trl {self.elapsed():6.0f}s] {name}: {' '.join(cmd[-8:])}", flush=True)
    with open(log, "w") as f:
      p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
      try:
        code = p.wait(timeout=limit)
      except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        code = -9
    dt = time.perf_counter() - t
    if code:
      with open(log) as f:
        tail = f.read()[-3000:]
      print(f"[vs_trl] {name} exited {code} after {dt:.0f}s; log tail:\n{tail}", flush=True)
    else:
      print(f"[vs_trl {self.elapsed():6.0f}s] {name} done in {dt:.0f}s", flush=True)
    return code, dt

  def device_env(self, gpus: int) -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # NVLink multicast stays off (the GPU machines' rule), also for programs started here.
    env.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    if self.args.smoke or self.card == "cpu":
      env["ACCELERATE_USE_CPU"] = "true"
      env["JAX_PLATFORMS"] = "cpu"
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={gpus}").strip()
      env["CUDA_VISIBLE_DEVICES"] = ""
    else:  # The first `gpus` of the GPUs this process may use (so sweeps can share a host GPU by GPU).
      visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
      ids = visible or [str(i) for i in range(gpus)]
      if len(ids) < gpus:
        raise ValueError(f"--gpus {gpus}: CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} names {len(ids)}")
      env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:gpus])
    return env

  def trl_site(self, kind: str) -> str:
    """A `pip install --target` of the pinned wheels (common + kind), made once per machine."""
    target = os.path.join(self.args.site_dir, kind)
    marker = os.path.join(target, ".vs_trl_installed")
    wheels = sorted(glob.glob(os.path.join(WHEELS, "common", "*.whl")) + glob.glob(os.path.join(WHEELS, kind, "*.whl")))
    names = [os.path.basename(w) for w in wheels]
    if not any(n.startswith(f"trl-{TRL_VERSIONS[kind]}-") for n in names):
      raise SystemExit(f"vs_trl: no trl-{TRL_VERSIONS[kind]} wheel in {WHEELS}/{kind}; download the wheels as "
                       "bench/README.md (vs_trl) says")
    if os.path.exists(marker) and open(marker).read().split() == names:
      return target
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run([self.args.trl_python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--disable-pip-version-check", "--target", target, *wheels], check=True)
    with open(marker, "w") as f:
      f.write("\n".join(names))
    return target

  # -- one comparison --

  def spec(self, algorithm: str, model: str, gpus: int) -> Spec:
    return make_spec(self.args, algorithm, model, gpus)

  def trl_command(self, spec_path: str, out: str, gc: bool, gpus: int) -> list[str]:
    worker = [os.path.join(REPO, "bench", "_trl_worker.py"), "--spec", spec_path, "--out", out,
              "--gradient-checkpointing", str(int(gc))]
    if gpus == 1:
      return [self.args.trl_python, *worker]
    # DDP over `gpus` processes (on CPU, with ACCELERATE_USE_CPU=true in the environment, over gloo).
    return [self.args.trl_python, "-m", "accelerate.commands.launch", "--num_processes", str(gpus),
            "--num_machines", "1", "--multi_gpu", "--mixed_precision", "bf16", "--dynamo_backend", "no",
            "--main_process_port", str(29500 + random.randrange(1000)), *worker]

  def compare(self, algorithm: str, model: str, gpus: int) -> None:
    spec = self.spec(algorithm, model, gpus)
    tag = f"{algorithm}-{model}-{gpus}gpu"
    spec_path = os.path.join(self.args.workdir, f"spec-{tag}.json")
    with open(spec_path, "w") as f:
      json.dump(dataclasses.asdict(spec), f, indent=1)
    common = common_fields(spec)
    rj = None
    if self.left() > 0:
      out = os.path.join(self.args.workdir, f"real_jax-{tag}.json")
      if os.path.exists(out):
        os.remove(out)
      code, dt = self.launch(f"real_jax-{tag}", [sys.executable, os.path.abspath(__file__), "--worker", "real_jax",
                                                 "--spec", spec_path, "--worker-out", out], self.device_env(gpus))
      rj = json.load(open(out)) if os.path.exists(out) else {"error": f"exit {code} after {dt:.0f}s, no result"}
    else:
      rj = {"error": "not run: the --budget was spent"}
    for gc in map(bool, self.args.trl_gc):
      trl = None
      if self.left() > 0:
        out = os.path.join(self.args.workdir, f"trl-{tag}-gc{int(gc)}.json")
        if os.path.exists(out):
          os.remove(out)
        env = self.device_env(gpus)
        site = self.trl_site(algorithm)
        env["PYTHONPATH"] = os.pathsep.join([site, REPO])
        env["ACCELERATE_MIXED_PRECISION"] = "bf16"
        env["TOKENIZERS_PARALLELISM"] = "false"
        env["HF_HUB_OFFLINE"] = "1"
        env["HF_DATASETS_OFFLINE"] = "1"
        cmd = self.trl_command(spec_path, out, gc, gpus)
        code, dt = self.launch(f"trl-{tag}-gc{int(gc)}", cmd, env)
        trl = json.load(open(out)) if os.path.exists(out) else {"error": f"exit {code} after {dt:.0f}s, no result"}
        trl["launch"] = " ".join(os.path.relpath(c, REPO) if c.startswith(REPO) else c for c in cmd)
      else:
        trl = {"error": "not run: the --budget was spent"}
      self.put(self.record(common, rj, trl, gc, spec))

  @staticmethod
  def record(common: dict, rj: dict, trl: dict, gc: bool, spec: Spec) -> dict:
    m_rj, m_trl = timed_mean(rj), timed_mean(trl)
    tps = lambda m: spec.tokens_per_iteration / m["iteration_s"] if m else None  # noqa: E731
    rec = {**common, "trl_gradient_checkpointing": gc, "real_jax_tokens_per_s": tps(m_rj),
           "trl_tokens_per_s": tps(m_trl)}
    rec["speedup"] = rec["real_jax_tokens_per_s"] / rec["trl_tokens_per_s"] if m_rj and m_trl else None
    rec["real_jax"] = {"phases_s": m_rj, **{k: v for k, v in rj.items() if k != "warmup"}}
    rec["trl"] = {"version": TRL_VERSIONS[spec.algorithm], "phases_s": m_trl,
                  **{k: v for k, v in trl.items() if k != "warmup"}}
    return rec

  def run(self) -> None:
    a = self.args
    print(f"[vs_trl] card {self.card_full}; writing {self.out}; budget {a.budget:.0f}s", flush=True)
    for gpus in a.gpus:
      for algorithm in a.algorithms:
        for model in a.models:
          self.compare(algorithm, model, gpus)
    self.summary()

  def summary(self) -> None:
    nan = float("nan")
    for r in self.doc["records"]:
      gc = "on " if r["trl_gradient_checkpointing"] else "off"
      rj, trl, s = (r[k] if r.get(k) is not None else nan for k in ("real_jax_tokens_per_s", "trl_tokens_per_s",
                                                                    "speedup"))
      print(f"  {r['algorithm']:4s} {r['model']:13s} {r['gpus']} GPU  TRL GC {gc}  real_jax {rj:9.0f} tok/s  "
            f"TRL {trl:9.0f} tok/s  speedup {s:.2f}", flush=True)


def _worker_result(directory: str, name: str) -> dict:
  """A worker's JSON from an earlier run's workdir, or an "error" saying why there is none."""
  path = os.path.join(directory, f"{name}.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  if os.path.exists(os.path.join(directory, "logs", f"{name}.log")):
    return {"error": f"failed: no {name}.json (see logs/{name}.log)"}
  return {"error": f"not run: no {name}.json and no log"}


def assemble(a) -> str:
  """Rebuilds records from the worker files that earlier runs left in their workdirs (`spec-<tag>.json`,
  `real_jax-<tag>.json`, `trl-<tag>-gc<g>.json`, `logs/`), e.g. when the orchestrator's own JSON was
  lost, with the same record code as a run: one record per spec and `--trl-gc` setting, merged into
  `--out` by key like a run. card and date come from the worker files (device name, file time)."""
  found = []
  for directory in a.assemble:
    for spec_path in sorted(glob.glob(os.path.join(directory, "spec-*.json"))):
      with open(spec_path) as f:
        spec = Spec(**{k: v for k, v in json.load(f).items() if k != "rows"})
      tag = os.path.basename(spec_path)[len("spec-"):-len(".json")]
      rj = _worker_result(directory, f"real_jax-{tag}")
      trls = {gc: _worker_result(directory, f"trl-{tag}-gc{int(gc)}") for gc in map(bool, a.trl_gc)}
      found.append((spec, rj, trls, max(os.path.getmtime(p) for p in glob.glob(os.path.join(directory, "*.json")))))
  if not found:
    raise SystemExit(f"vs_trl --assemble: no spec-*.json in {' '.join(a.assemble)}")
  devices = {r["device"] for _, rj, trls, _ in found for r in (rj, *trls.values()) if r.get("device")}
  if len(devices) != 1:
    raise SystemExit(f"vs_trl --assemble: the worker files name {len(devices)} devices: {sorted(devices)}")
  full = devices.pop()
  date = datetime.datetime.fromtimestamp(max(t for *_, t in found), datetime.timezone.utc).date().isoformat()
  orch = Orchestrator(a, card=(short_card(full), full), date=date)
  for spec, rj, trls, _ in found:
    for gc, trl in trls.items():
      rec = orch.record(common_fields(spec), rj, trl, gc, spec)
      if a.note:
        rec["note"] = a.note
      orch.put(rec)
  orch.summary()
  return orch.out


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--gpus", type=int, nargs="+", default=[1], help="device counts, one sweep each")
  ap.add_argument("--algorithms", nargs="+", default=["grpo", "ppo"], choices=["grpo", "ppo"])
  ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  ap.add_argument("--budget", type=float, default=450.0, help="seconds after which no system run starts")
  ap.add_argument("--grace", type=float, default=100.0, help="a run still going at budget + grace is killed")
  ap.add_argument("--trl-gc", type=int, nargs="*", default=[1, 0], choices=[0, 1],
                  help="TRL gradient checkpointing settings, in run order (none: real_jax alone; its worker "
                       "JSON stays in --workdir, no record is written)")
  ap.add_argument("--grpo-prompts", type=int, default=64)
  ap.add_argument("--group-size", type=int, default=4)
  ap.add_argument("--ppo-prompts", type=int, default=64)
  ap.add_argument("--prompt-len", type=int, default=256)
  ap.add_argument("--response-len", type=int, default=256)
  ap.add_argument("--micro-rows", type=int, default=8, help="rows per device per train/inference micro-batch")
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--iterations", type=int, default=2)
  ap.add_argument("--lr", type=float, default=1e-6)
  ap.add_argument("--beta", type=float, default=0.04, help="GRPO KL coefficient (both systems)")
  ap.add_argument("--kl-coef", type=float, default=0.05, help="PPO KL-in-reward coefficient (both systems)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--smoke", action="store_true", help="CPU: toy models, 4 prompts, 8 + 8 tokens")
  ap.add_argument("--trl-python", default=sys.executable, help="interpreter with torch/transformers/accelerate")
  ap.add_argument("--workdir", default="/tmp/vs_trl")
  ap.add_argument("--site-dir", default=None, help="where the TRL wheels are installed (default WORKDIR/site)")
  ap.add_argument("--out", default=None)
  ap.add_argument("--fresh", action="store_true", help="drop the records of an existing --out file")
  ap.add_argument("--mirror", default=None, help="also write the JSON into this folder (e.g. $OUT) each time")
  ap.add_argument("--assemble", nargs="+", metavar="DIR", default=None,
                  help="no runs: build the records from the worker files of earlier runs' workdirs")
  ap.add_argument("--note", default=None, help="with --assemble: a note stored in each record built")
  ap.add_argument("--worker", choices=["real_jax"], help=argparse.SUPPRESS)
  ap.add_argument("--spec", help=argparse.SUPPRESS)
  ap.add_argument("--worker-out", help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.smoke:
    a.grpo_prompts, a.group_size, a.ppo_prompts = 4, 2, 4
    a.prompt_len, a.response_len, a.micro_rows = 8, 8, 2
    a.out = a.out or os.path.join(a.workdir, "vs_trl-smoke.json")
    a.budget = max(a.budget, 3600.0)  # CPU compilation is slow; the smoke run is not budgeted.
  a.site_dir = a.site_dir or os.path.join(a.workdir, "site")
  return a


def main(argv=None):
  a = parse_args(argv)
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  if a.worker:
    with open(a.spec) as f:
      return real_jax_worker(Spec(**{k: v for k, v in json.load(f).items() if k != "rows"}), a.worker_out)
  if a.assemble:
    print(f"[vs_trl] wrote {assemble(a)}")
    return
  os.makedirs(a.workdir, exist_ok=True)
  Orchestrator(a).run()


if __name__ == "__main__":
  main()

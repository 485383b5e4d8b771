r"""PPO throughput settings of `bench/plans.py` (searched plan vs heuristics on one 4-GPU host).

    python -m search --config configs/ppo_bench.py:models=1.3b,gen=1024 --devices 4
    python -m real_jax.train --config configs/ppo_bench.py:models=tiny,gen=8 --workdir /tmp/ppo_bench

Presets (`:key=value,...`): models=1.3b|7b|7b7b|tiny, gen=<new tokens>, batch=<prompts per iteration>
(default per models), prompt=<prompt tokens> (default 128; tiny: 16).

* models=1.3b: actor and reference 1.3B-shaped (`real_jax.models` preset "1.3b"), critic and reward
  350M-shaped; 128 prompts per iteration.
* models=7b: actor and reference LLaMA-2-7B-shaped, critic and reward 1.3B-shaped; 64 prompts.
* models=7b7b: all four models LLaMA-2-7B-shaped (the ReaL paper's smallest setting); 64 prompts. Needs
  more than 80 GB per GPU: run on 4x H200 (bench/README.md, third 4-GPU session) at gen=512 and 1024, the
  searched plan 1.09x and 1.10x the colocated tensor=4 plan.
* models=tiny: the "tiny" preset everywhere; 16 prompts (CPU smoke runs).

Random-init models with a random reward *model*: this measures throughput, not learning. bf16
compute, fp32 master weights for the trained actor and critic; the frozen reference stores bf16
weights (nothing updates them); the reward model has the critic's config, so critic and reward
inference share compiled programs. PPO: 1 epoch of 4 mini-batches per iteration, full
rematerialisation in training. The built-in arithmetic task only names a data source for `run()`;
`bench/plans.py` feeds random prompts of exactly `prompt` tokens and samples with no EOS, so every
response has `gen` tokens.

`experiment_dict` returns a plain dict (what `real_jax.experiment.experiment_from_config` reads), so
`bench/plans.py` needs no ml_collections; `get_config` wraps it in a ConfigDict for the CLIs.
"""

MODELS = {
    # name: (actor/ref preset, critic/reward preset, prompts per iteration)
    "1.3b": ("1.3b", "350m", 128),
    "7b": ("7b", "1.3b", 64),
    "7b7b": ("7b", "7b", 64),
    "tiny": ("tiny", "tiny", 16),
}


def experiment_dict(models="1.3b", gen=512, *, batch=None, prompt=None, plan="colocated"):
  """The experiment of one bench setting as a plain dict."""
  if models not in MODELS:
    raise ValueError(f"models={models!r}: expected one of {sorted(MODELS)}")
  big, small, default_batch = MODELS[models]
  batch = int(batch or default_batch)
  prompt = int(prompt or (16 if models == "tiny" else 128))
  gen = int(gen)
  # No max_seq_len override (the presets' 2048 / 4096 cover every setting): a model's config, hence
  # its parameters and compiled init, is the same for every generation length.
  if models == "tiny":
    common = dict(vocab_size=64)
  else:
    common = dict(dtype="bfloat16", param_dtype="float32", remat="full")
  frozen = dict(common, param_dtype="bfloat16") if models != "tiny" else common
  return {
      "algorithm": "ppo",
      "seed": 0,
      "num_iterations": 4,
      "checkpoint_every": 0,
      "sft_warmup_steps": 0,
      "log_every": 1,
      "models": {
          "actor": dict(preset=big, overrides=common, head="lm", init="random", rule="", seed=0),
          "ref": dict(preset=big, overrides=frozen, head="lm", init="random", rule="", seed=3),
          "critic": dict(preset=small, overrides=common, head="scalar", init="random", rule="", seed=1),
          "reward": dict(preset=small, overrides=common, head="scalar", init="random", rule="", seed=2),
      },
      "optim": {
          "actor": dict(lr=1e-6, warmup_steps=0, decay="constant", decay_steps=1, clip_norm=1.0),
          "critic": dict(lr=5e-6, warmup_steps=0, decay="constant", decay_steps=1, clip_norm=1.0),
      },
      "data": dict(task="arithmetic", task_kwargs={"difficulty": 3}, batch_size=batch, max_prompt_len=prompt),
      "sampling": dict(max_new_tokens=gen, temperature=1.0, top_k=0, top_p=1.0, n_samples=1),
      "ppo": dict(gamma=1.0, lam=0.95, clip_eps=0.2, kl_coef=0.05, kl_in_reward=True, whiten_advantages=True,
                  ppo_epochs=1, mini_batches=4, value_clip_eps=0.2),
      "plan": plan,
      "colocated_strategy": "",
  }


def get_config(arg=None):
  import ml_collections

  from real_jax import config_lib as cl

  args = cl.parse_arg(arg, models=tuple(MODELS), gen=int, batch=int, prompt=int, plan=str)
  return ml_collections.ConfigDict(experiment_dict(args["models"], args["gen"] or 512, batch=args["batch"],
                                                   prompt=args["prompt"], plan=args["plan"] or "colocated"))

"""Train-step benchmark: tokens/s and MFU of the generic train step (next-token loss).

    PYTHONPATH=$PWD python bench/train.py --out results.json     # GPU, 4 devices
    PYTHONPATH=$PWD python bench/train.py --small                 # CPU smoke run (8 fake devices)

Shapes (issue 4): LLaMA-1B and 7B shapes, sequence 1024, layouts fsdp=4 and data=2 x fsdp=2,
mixed precision (bf16 compute, fp32 master weights and AdamW moments), remat "dots" (falls back to
"full" if it does not fit).

MFU = 6 x params x tokens / step time / (GPUs x peak): `mfu_measured_peak` uses the bf16 matmul rate
measured in this run (8192^3 matmul), `mfu_datasheet` the 989 TFLOP/s of the H100 SXM datasheet.
Attention FLOPs are not counted (the usual 6ND convention), so MFU slightly understates work done.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback

DATASHEET = {"h100": 989e12, "h200": 989e12}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=None)
  ap.add_argument("--small", action="store_true")
  ap.add_argument("--models", nargs="+", default=["7b", "1b"])
  ap.add_argument("--batch", type=int, default=16, help="sequences per step (global)")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--remat", default="dots")
  ap.add_argument("--budget-s", type=float, default=1e9, help="start no new case after this many seconds")
  ap.add_argument("--gen-json", default=None, help="generate results to merge into the output")
  ap.add_argument("--layouts", nargs="+", default=["fsdp=4", "data=2,fsdp=2"],
                  help="layouts as axis=size lists, e.g. fsdp=4, data=2,fsdp=2, or single (one device)")
  ap.add_argument("--seq", type=int, default=1024)
  ap.add_argument("--micro", type=int, nargs="+", default=[1], help="micro-batch counts, one case each")
  ap.add_argument("--attention", nargs="+", default=["auto"], choices=["auto", "xla", "cudnn"],
                  help="ModelConfig.attention_impl (auto: None), one case each")
  ap.add_argument("--logits-chunk", type=int, nargs="+", default=[0],
                  help="ModelConfig.logits_chunk values (0: auto), one case each")
  ap.add_argument("--unroll-layers", type=int, nargs="+", default=[0], choices=[0, 1],
                  help="ModelConfig.unroll_layers values, one case each")
  ap.add_argument("--parts", action="store_true",
                  help="also time the step's halves as separate programs (train_step.make_train_parts): the "
                  "gradients (forward + backward over the micro-batches) and the optimizer update")
  ap.add_argument("--profile-dir", default=None,
                  help="after timing, trace one more step of each case with jax.profiler (perfetto trace) here")
  args = ap.parse_args()
  if args.small:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import json

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from bench._common import header, matmul_peak, timed, write
  from real_jax.models import create_model, get_config, param_count
  from real_jax.optim import OptimizerConfig
  from real_jax.train_step import init_train_state, make_train_parts, make_train_step, next_token_loss
  from sharding import Layout

  out = header()
  if args.gen_json and os.path.exists(args.gen_json):
    g = json.load(open(args.gen_json))
    out.update({k: g[k] for k in ("generate", "hbm_bytes_per_s", "bf16_consistency") if k in g})
  peak = matmul_peak(n=512 if args.small else 8192)
  out["matmul_bf16_flops_per_s"] = peak
  datasheet = DATASHEET.get(out["card"], 989e12)
  out["datasheet_bf16_flops_per_s"] = datasheet
  out["train"] = []
  if args.small:
    models, seq, batch = ["tiny"], 32, 8
    layouts = {"fsdp=4": Layout.on(0, fsdp=4), "data=2,fsdp=2": Layout.on(0, data=2, fsdp=2)}
  else:
    models, seq, batch = args.models, args.seq, args.batch
    layouts = {name: Layout.on(0, **_axes(name)) for name in args.layouts}
  opt = OptimizerConfig(lr=1e-5, warmup_steps=10, decay_steps=1000)
  t_start = time.perf_counter()
  cases = [(name, lname, layout, k, attn, chunk, unroll) for name in models for lname, layout in layouts.items()
           for k in args.micro for attn in args.attention for chunk in args.logits_chunk for unroll in args.unroll_layers]
  for name, lname, layout, k, attn, chunk, unroll in cases:
    for remat in ([args.remat, "full"] if args.remat not in ("full", "none") else [args.remat]):
      rec = {"model": name, "layout": lname, "seq": seq, "batch": batch, "remat": remat, "precision": "bf16/fp32-master",
             "micro_batches": k, "attention_impl": attn, "logits_chunk": chunk, "unroll_layers": bool(unroll)}
      st = None
      if time.perf_counter() - t_start > args.budget_s:
        rec.update({"tokens_per_s": None, "mfu_measured_peak": None, "mfu_datasheet": None,
                    "error": "not run: this run's time budget was spent"})
        out["train"].append(rec)
        break
      try:
        cfg = get_config(name, dtype="bfloat16", param_dtype="float32", remat=remat, logits_chunk=chunk,
                         attention_impl=None if attn == "auto" else attn, unroll_layers=bool(unroll))
        model = create_model(cfg, layout, seed=0)
        graphdef = nnx.graphdef(model)
        st = init_train_state(model, opt, layout)
        del model
        rng = np.random.default_rng(0)
        b = {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, size=(batch, seq)), jnp.int32),
             "mask": jnp.ones((batch, seq), bool)}
        step = make_train_step(graphdef, next_token_loss, opt, layout, micro_batches=k, params=st.params,
                               batch_example=b)
        t0 = time.perf_counter()
        st, met = step(st, b)
        jax.block_until_ready(met)
        rec["compile_s"] = time.perf_counter() - t0
        times = []
        for _ in range(args.steps):
          t, (st, met) = timed(step, st, b)
          times.append(t)
        t = float(np.median(times))
        if args.parts:
          try:  # A failure here (say, out of memory) keeps the fused step's time.
            st, parts = _time_parts(make_train_parts(graphdef, next_token_loss, opt, layout, micro_batches=k,
                                                     params=st.params, batch_example=b), st, b, args.steps, timed)
            rec.update(parts, step_minus_parts_s=t - parts["grads_s"] - parts["update_s"])
          except Exception as e:  # noqa: BLE001
            rec["parts_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            st = None  # The update may have consumed (donated) it; the case ends with this record.
        if args.profile_dir and st is not None:
          d = os.path.join(args.profile_dir, f"{name}-{lname}-k{k}-{attn}-c{chunk}-u{unroll}-{remat}".replace("=", "").replace(",", "_"))
          with jax.profiler.trace(d, create_perfetto_trace=True):
            st, met = step(st, b)
            jax.block_until_ready(met)
        n = param_count(cfg)
        tok = batch * seq
        flops = 6 * n * tok
        ndev = layout.strategy.size
        rec.update({"params": n, "step_s": t, "tokens_per_s": tok / t, "loss": float(met["loss"]),
                    "mfu_measured_peak": flops / t / (ndev * peak), "mfu_datasheet": flops / t / (ndev * datasheet)})
        print(f"[train] {name} {lname} k={k} attention={attn} chunk={chunk} unroll={unroll} remat={remat}: "
              f"{t * 1e3:.1f} ms/step, compile {rec['compile_s']:.0f} s, "
              f"MFU {rec['mfu_measured_peak']:.3f} (measured peak)" +
              (f"; gradients {rec['grads_s'] * 1e3:.1f} ms, update {rec['update_s'] * 1e3:.1f} ms" if "grads_s" in rec
               else f"; parts: {rec['parts_error']}" if "parts_error" in rec else ""), flush=True)
        out["train"].append(rec)
        write(args.out, out)
        break
      except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        rec.update({"tokens_per_s": None, "mfu_measured_peak": None, "mfu_datasheet": None,
                    "error": f"{type(e).__name__}: {str(e)[:300]}"})
        out["train"].append(rec)
        write(args.out, out)
      finally:
        del st
        gc.collect()
  write(args.out, out)


def _time_parts(parts, st, batch, steps: int, timed):
  """(state, {grads_s, update_s}): the median seconds of each half of the step (`make_train_parts`),
  each program compiled by an untimed first run; the state comes back updated (the update donates it)."""
  import jax
  import numpy as np
  grads, update = parts
  st, _ = update(st, grads(st.params, batch)[0])  # Compiles both.
  jax.block_until_ready(st)
  gt, ut = [], []
  for _ in range(steps):
    tg, out = timed(grads, st.params, batch)
    g = out[0]
    del out  # One fp32 gradient alive at a time, as in the fused step.
    tu, (st, _) = timed(update, st, g)
    del g
    gt.append(tg)
    ut.append(tu)
  return st, {"grads_s": float(np.median(gt)), "update_s": float(np.median(ut))}


def _axes(name: str) -> dict:
  """"fsdp=4" / "data=2,fsdp=2" -> Layout.on keyword sizes; "single" -> one device."""
  if name == "single":
    return {}
  try:
    return {k: int(v) for k, v in (part.split("=") for part in name.split(","))}
  except ValueError:
    raise SystemExit(f"bench/train.py: layout {name!r} is not 'single' or axis=size[,axis=size]") from None


if __name__ == "__main__":
  main()

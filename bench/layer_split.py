"""The unrolled layer loop's weight split against static slices: one train step, timed both ways.

    PYTHONPATH=$PWD python bench/layer_split.py --layouts tensor=4 fsdp=4 --out results.json   # 4 GPUs
    PYTHONPATH=$PWD python bench/layer_split.py --small                                        # CPU smoke run

`Transformer.hidden` unrolls full-sequence layer loops over per-layer weights (`layer_arrays`). Taken
as static slices (`a[i]`), each slice's gradient is a pad to the whole [L, ...] stack and the stacked
gradient the sum of L pads; on GPU XLA fused that chain into the optimizer's reductions (the global
norm's sum of squares), single kernels of 17-56 ms. `layer_arrays` now splits with `lax.split`, whose
gradient is one concatenate. Each case builds the step the way `train_step.make_train_step` does,
with `layer_arrays` swapped for the variant (`split`: the code as it is; `slices`: the previous code,
kept here as the baseline), optionally with an optimization barrier between the gradients and the
update (`--barrier`: the other cure, which keeps the fusion out by materialising the gradients).

Recorded per case: step_s (median of --steps after a compiling run), compile_s, XLA's temp bytes,
how many computations hold more than 16 pads (the fused pad chains), and the roofline: the step's
matmul FLOPs (8 x params x tokens with remat "full": forward, recomputed forward, backward) over the
GPUs at the bf16 matmul rate measured in this run.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback


def _slices(stacked, n_layers):
  """The previous `layer_arrays`: static slices (each one's gradient a pad to the whole stack)."""
  return [{name: a[i] for name, a in stacked.items()} for i in range(n_layers)]


def pad_chains(hlo_text: str, min_pads: int = 16) -> int:
  """Computations of a compiled module holding more than min_pads pad instructions: the static slices'
  gradient (a pad per layer, summed) fused into one kernel."""
  n, pads = 0, 0
  for line in hlo_text.split("\n"):
    if line.endswith("{"):
      pads = 0
    elif " pad(" in line:
      pads += 1
      n += pads == min_pads + 1
  return n


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default=None)
  ap.add_argument("--small", action="store_true", help="CPU smoke run: the tiny model on 8 fake devices")
  ap.add_argument("--model", default="7b")
  ap.add_argument("--layouts", nargs="+", default=["tensor=4", "fsdp=4"])
  ap.add_argument("--shapes", nargs="+", default=["16x256"], help="rows x tokens per step, one case each")
  ap.add_argument("--variants", nargs="+", default=["split", "slices"], choices=["split", "slices"])
  ap.add_argument("--barrier", action="store_true", help="also each variant with a barrier before the update")
  ap.add_argument("--steps", type=int, default=3)
  args = ap.parse_args(argv)
  if args.small and "jax" not in sys.modules:  # Before JAX starts (a test's process has its devices already).
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  import real_jax.models.transformer as transformer
  from bench._common import header, matmul_peak, timed, write
  from real_jax import train_step as ts
  from real_jax.models import create_model, get_config, param_count
  from real_jax.optim import OptimizerConfig
  from sharding import Layout

  model_name, shapes = ("tiny", ["8x32"]) if args.small else (args.model, args.shapes)
  opt = OptimizerConfig(lr=1e-5, warmup_steps=10, decay_steps=1000)
  splitting = {"split": transformer.layer_arrays, "slices": _slices}
  out = header()
  peak = matmul_peak(n=512 if args.small else 8192)
  out.update(matmul_bf16_flops_per_s=peak, model=model_name, remat="full", cases=[])

  def build(graphdef, layout, params, batch, barrier):
    grads_of, update = ts._grads_fn(graphdef, ts.next_token_loss, layout, 1), ts._update_fn(opt)

    def step(state, batch):
      grads, loss, _ = grads_of(state.params, batch)
      if barrier:
        grads = jax.lax.optimization_barrier(grads)
      new, grad_norm = update(state, grads)
      return new, {"loss": loss, "grad_norm": grad_norm}

    sh, bsh = ts.step_shardings(params, opt, layout, batch)
    return jax.jit(step, in_shardings=(sh, bsh), out_shardings=(sh, layout.replicated()), donate_argnames=("state",))

  try:
    for lname in args.layouts:
      axes = {k: int(v) for k, v in (kv.split("=") for kv in lname.split(","))}
      layout = Layout.on(0, **axes)
      cfg = get_config(model_name, dtype="bfloat16", param_dtype="float32", remat="full", unroll_layers=True)
      model = create_model(cfg, layout, seed=0)
      graphdef = nnx.graphdef(model)
      state = ts.init_train_state(model, opt, layout)
      del model
      for shape in shapes:
        rows, seq = (int(x) for x in shape.split("x"))
        rng = np.random.default_rng(0)
        batch = {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, size=(rows, seq)), jnp.int32),
                 "mask": jnp.ones((rows, seq), bool)}
        roofline = 8 * param_count(cfg) * rows * seq / layout.strategy.size / peak
        for variant in args.variants:
          for barrier in ([False, True] if args.barrier else [False]):
            rec = {"layout": lname, "rows": rows, "seq": seq, "layers": variant, "barrier": barrier,
                   "roofline_s": roofline}
            transformer.layer_arrays = splitting[variant]
            try:
              t0 = time.perf_counter()
              compiled = build(graphdef, layout, state.params, batch, barrier).lower(state, batch).compile()
              rec["compile_s"] = time.perf_counter() - t0
              rec["temp_gib"] = compiled.memory_analysis().temp_size_in_bytes / 2**30
              rec["pad_chains"] = pad_chains(compiled.as_text())
              state, met = compiled(state, batch)
              jax.block_until_ready(met)
              times = []
              for _ in range(args.steps):
                t, (state, met) = timed(compiled, state, batch)
                times.append(t)
              rec["step_s"] = float(np.median(times))
              rec["roofline_fraction"] = roofline / rec["step_s"]
              rec["loss_finite"] = bool(np.isfinite(float(met["loss"])))
            except Exception as e:  # noqa: BLE001  (out of memory: the record says so, the run goes on)
              traceback.print_exc()
              rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
              state = ts.init_train_state(create_model(cfg, layout, seed=0), opt, layout)  # It may be donated.
            finally:
              transformer.layer_arrays = splitting["split"]
            out["cases"].append(rec)
            print(f"[layer_split] {lname} {rows}x{seq} {variant}{' +barrier' if barrier else ''}: "
                  + (f"{rec['step_s'] * 1e3:.1f} ms (roofline {roofline * 1e3:.1f} ms), "
                     f"{rec['pad_chains']} pad chains" if "step_s" in rec else rec["error"]), flush=True)
            write(args.out, out)
      del state
      gc.collect()
  finally:
    transformer.layer_arrays = splitting["split"]
  write(args.out, out)
  return out


if __name__ == "__main__":
  main()

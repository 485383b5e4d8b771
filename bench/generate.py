"""Generation benchmark: tokens/s and the fraction of the decode HBM roofline, beside HF generate.

    PYTHONPATH=$PWD python bench/generate.py --out results.json            # GPU
    PYTHONPATH=$PWD python bench/generate.py --small                        # CPU smoke run
    PYTHONPATH=$PWD python bench/generate.py --hf --out hf.json             # HF transformers side

Shapes (issue 4): LLaMA-1B and 7B shapes, bf16, batch 64 and 256, prompt 256, 256 new tokens
forced (no EOS), greedy, tensor=1 (device 0) and tensor=4 (devices 0-3).

Decode roofline: one decode step must read every weight used per token (all layer matrices and the
LM head; the embedding only for the looked-up rows) and the KV cache of the tokens that are in
context, so the floor of a step is bytes / (HBM bandwidth x GPUs), HBM bandwidth measured here by a
device copy (read + write). KV bytes use the *average* context over the run (prompt + half the new
tokens), not the pre-allocated cache length: the stricter count. `roofline_fraction` = floor /
measured decode step time, the decode step time being (generate time - prefill time) / steps.
`tokens_per_s` = batch x new tokens / whole generate time (prefill included), the same quantity
measured for HF.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback

T0 = time.perf_counter()


def kv_bytes_per_token(cfg) -> int:
  return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2  # k and v, bf16


def weight_bytes_per_step(cfg) -> int:
  from real_jax.models import param_count
  n = param_count(cfg)
  embed = cfg.vocab_size * cfg.d_model
  # Untied: the embedding table is not read by a step (only B rows). Tied: it is the LM head.
  return 2 * (n - (0 if cfg.tie_embeddings else embed))


def memory_needed(cfg, batch: int, slots: int) -> float:
  """Bytes of bf16 weights + a full bf16 KV cache of `slots` slots (what must sit in HBM)."""
  from real_jax.models import param_count
  return 2 * param_count(cfg) + batch * slots * kv_bytes_per_token(cfg)


def too_big(cfg, batch: int, slots: int, tensor: int, hbm_bytes: float) -> str | None:
  need = memory_needed(cfg, batch, slots) / tensor
  if need > 0.92 * hbm_bytes:
    return f"does not fit: needs {need / 2**30:.1f} GiB per GPU (weights + KV cache) of {hbm_bytes / 2**30:.1f}"
  return None


def run_jax(args, out: dict):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from bench._common import hbm_bandwidth, timed, write
  from real_jax.generation import SamplingConfig, generate
  from real_jax.models import create_model, get_config
  from sharding import Layout

  if args.small:
    models, batches, tensors, prompt, new = ["tiny"], [8], [1, 4], 16, 8
  else:
    models, batches, tensors, prompt, new = args.models, args.batches, args.tensors, 256, 256
  bw = hbm_bandwidth(gib=0.25 if args.small else 2.0)
  out["hbm_bytes_per_s"] = bw
  hf = {}
  if args.hf_json and os.path.exists(args.hf_json):
    hf = {(r["model"], r["batch"]): r for r in json.load(open(args.hf_json))["hf"]}
  out.setdefault("generate", [])
  scan_choice = None
  for name in models:
    for tensor in tensors:
      cfg = get_config(name, dtype="bfloat16", param_dtype="bfloat16", max_seq_len=4096)
      layout = Layout.on(0, tensor=tensor)
      try:
        model = create_model(cfg, layout, seed=0)
      except Exception as e:  # noqa: BLE001
        for b in batches:
          out["generate"].append({"model": name, "batch": b, "tensor": tensor, "tokens_per_s": None,
                                  "error": f"create: {type(e).__name__}: {str(e)[:200]}"})
        continue
      graphdef, state = nnx.split(model)
      for b in batches:
        rec = {"model": name, "batch": b, "tensor": tensor, "prompt": prompt, "new_tokens": new}
        hbm = jax.devices()[0].memory_stats().get("bytes_limit", 80e9) if not args.small else 1e12
        reason = too_big(cfg, b, prompt + new, tensor, hbm)
        if time.perf_counter() - T0 > args.budget_s:
          reason = "not run: this run's time budget was spent"
        if reason:
          h = hf.get((name, b))
          rec.update({"tokens_per_s": None, "roofline_fraction": None, "error": reason,
                      "hf_tokens_per_s": h.get("tokens_per_s") if (h and tensor == 1) else None})
          if h and h.get("error"):
            rec["hf_note"] = h["error"]
          out["generate"].append(rec)
          continue
        try:
          rng = np.random.default_rng(0)
          toks = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(b, prompt)), jnp.int32)
          mask = jnp.ones((b, prompt), bool)
          variants = [False, True] if scan_choice is None and not args.small else [bool(scan_choice)]
          best = None
          for scan in variants:
            sc = SamplingConfig(max_new_tokens=new, greedy=True, eos_id=None, bucket=256, scan_layers=scan)
            t0 = time.perf_counter()
            jax.block_until_ready(generate((graphdef, state), toks, mask, jax.random.key(0), sc, layout).tokens)
            compile_s = time.perf_counter() - t0
            t, r = timed(lambda: generate((graphdef, state), toks, mask, jax.random.key(0), sc, layout).tokens,
                         reps=args.reps)
            rec[f"time_s_scan_layers_{scan}"] = t
            if best is None or t < best[0]:
              best = (t, scan, compile_s)
          t, scan, compile_s = best
          if scan_choice is None:
            scan_choice = scan
          # Prefill alone (the same forward, no decode loop) to isolate the decode step time.
          from real_jax._calls import compute_params
          from real_jax.models.transformer import KVCache

          @jax.jit
          def prefill(state, toks, mask):
            m = nnx.merge(graphdef, compute_params(state, cfg.dtype))
            cache = KVCache.zeros(cfg, b, prompt + new)
            h, cache = m.hidden(toks, attention_mask_BT=mask, cache=cache)
            return m.project(h[:, -1:]), cache.k[0, 0, 0]
          jax.block_until_ready(prefill(state, toks, mask))
          t_pre, _ = timed(prefill, state, toks, mask, reps=3)
          step = (t - t_pre) / (new - 1)
          avg_ctx = prompt + new / 2
          bytes_step = weight_bytes_per_step(cfg) + b * avg_ctx * kv_bytes_per_token(cfg)
          floor = bytes_step / (bw * tensor)
          rec.update({
              "tokens_per_s": b * new / t, "time_s": t, "prefill_s": t_pre, "decode_step_ms": 1e3 * step,
              "roofline_step_ms": 1e3 * floor, "roofline_fraction": floor / step, "scan_layers": scan,
              "compile_s": compile_s, "bytes_per_step": bytes_step,
          })
          h = hf.get((name, b))
          rec["hf_tokens_per_s"] = h.get("tokens_per_s") if (h and tensor == 1) else None
          if h and tensor == 1 and h.get("error"):
            rec["hf_note"] = h["error"]
          if tensor != 1:
            rec["hf_note"] = "HF generate measured on one GPU only (tensor=1 rows)"
        except Exception as e:  # noqa: BLE001
          traceback.print_exc()
          rec.update({"tokens_per_s": None, "roofline_fraction": None, "error": f"{type(e).__name__}: {str(e)[:300]}"})
          h = hf.get((name, b))
          rec["hf_tokens_per_s"] = h.get("tokens_per_s") if (h and tensor == 1) else None
        out["generate"].append(rec)
        write(args.out, out)
        gc.collect()
      del model, graphdef, state
      gc.collect()
  if not args.small and time.perf_counter() - T0 < args.budget_s:
    out["bf16_consistency"] = bf16_gap()
    write(args.out, out)


def bf16_gap():
  """max/mean |generation log-prob - inference log-prob| for a 1B-shaped bf16 model (fp32 masters)."""
  import jax
  import numpy as np

  from real_jax import inference
  from real_jax.generation import SamplingConfig, generate
  from real_jax.models import create_model, get_config
  from sharding import Layout

  res = {}
  for name, dt in (("1b", "bfloat16"),):
    cfg = get_config(name, dtype=dt, param_dtype="float32", max_seq_len=4096)
    layout = Layout.on(0)
    m = create_model(cfg, layout, seed=1)
    toks = np.random.default_rng(1).integers(3, cfg.vocab_size, size=(8, 64)).astype(np.int32)
    mask = np.ones((8, 64), bool)
    r = generate(m, toks, mask, jax.random.key(0), SamplingConfig(max_new_tokens=64, temperature=1.0), layout)
    lp = inference.logprobs(m, r.tokens, r.attention_mask, layout)
    sel = np.asarray(r.logprob_mask)
    d = np.abs(np.asarray(lp) - np.asarray(r.logprobs))[sel]
    res[f"{name}_{dt}"] = {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "tokens": int(sel.sum())}
    del m
  return res


def run_hf(args):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  from real_jax.models import get_config

  res = {"hf": [], "torch": torch.__version__}
  import transformers
  res["transformers"] = transformers.__version__
  for name in args.models:
    cfg = get_config(name)
    hcfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                       num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                       num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_eps,
                       rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                       max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device("cuda"):
      model = LlamaForCausalLM(hcfg).to(torch.bfloat16).eval()
    for b in args.batches:
      rec = {"model": name, "batch": b}
      free, _ = torch.cuda.mem_get_info()
      need = 2 * sum(p.numel() for p in model.parameters()) + b * 512 * kv_bytes_per_token(cfg)
      if need > free + 2 * sum(p.numel() for p in model.parameters()):
        rec.update({"tokens_per_s": None, "error": f"does not fit: weights + KV cache need {need / 2**30:.1f} GiB"})
        res["hf"].append(rec)
        print(rec, flush=True)
        continue
      try:
        ids = torch.randint(3, cfg.vocab_size, (b, 256), device="cuda")
        att = torch.ones_like(ids)
        kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        with torch.no_grad():
          model.generate(ids, attention_mask=att, max_new_tokens=8, min_new_tokens=8, **kw)
          torch.cuda.synchronize()
          t = time.perf_counter()
          out = model.generate(ids, attention_mask=att, max_new_tokens=256, min_new_tokens=256, **kw)
          torch.cuda.synchronize()
          dt = time.perf_counter() - t
        new = out.shape[1] - 256
        rec.update({"tokens_per_s": b * new / dt, "time_s": dt, "new_tokens": new})
      except torch.OutOfMemoryError as e:
        rec.update({"tokens_per_s": None, "error": f"OOM: {str(e)[:160]}"})
      except Exception as e:  # noqa: BLE001
        rec.update({"tokens_per_s": None, "error": f"{type(e).__name__}: {str(e)[:200]}"})
      res["hf"].append(rec)
      print(rec, flush=True)
      torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
  with open(args.out, "w") as f:
    json.dump(res, f, indent=1)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=None)
  ap.add_argument("--small", action="store_true", help="tiny model on CPU (8 fake devices)")
  ap.add_argument("--hf", action="store_true", help="run only the HF transformers side (torch)")
  ap.add_argument("--hf-json", default=None, help="HF results to put beside the JAX ones")
  ap.add_argument("--models", nargs="+", default=["1b", "7b"])
  ap.add_argument("--batches", nargs="+", type=int, default=[64, 256])
  ap.add_argument("--tensors", nargs="+", type=int, default=[1, 4])
  ap.add_argument("--reps", type=int, default=1)
  ap.add_argument("--budget-s", type=float, default=1e9, help="start no new case after this many seconds")
  args = ap.parse_args()
  if args.hf:
    return run_hf(args)
  if args.small:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from bench._common import header
  out = header()
  run_jax(args, out)


if __name__ == "__main__":
  main()

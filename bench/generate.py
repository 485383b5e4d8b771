"""Generation benchmark: tokens/s and the fraction of the decode HBM roofline, beside HF generate.

    PYTHONPATH=$PWD python bench/generate.py --out results.json            # GPU, all cases
    PYTHONPATH=$PWD python bench/generate.py --small                        # CPU smoke run
    PYTHONPATH=$PWD python bench/generate.py --hf --out hf.json             # HF transformers side
    PYTHONPATH=$PWD python bench/generate.py --only 7b:64:1 --breakdown --hf-json hf.json --out r.json

Shapes (issue 4): LLaMA-1B and 7B shapes, bf16, batch 64 and 256, prompt 256, 256 new tokens
forced (no EOS), greedy, tensor=1 (device 0) and tensor=4 (devices 0-3). `--only M:B:T` runs one
case (and skips the bf16 consistency run).

Decode roofline: one decode step must read every weight used per token (all layer matrices and the
LM head; the embedding only for the looked-up rows) and the KV cache of the tokens that are in
context, so the floor of a step is bytes / (HBM bandwidth x GPUs), HBM bandwidth measured here by a
device copy (read + write). KV bytes use the *average* context over the run (prompt + half the new
tokens), not the pre-allocated cache length: the stricter count. `roofline_fraction` = floor /
measured decode step time (`roofline_fraction_read_bw`: the same against a read-only pass, a sum
over 2 GiB of bf16, `hbm_read_bytes_per_s`), the decode step time being (generate time - prefill time) / (new - 1),
prefill timed alone as the sampler runs it. `tokens_per_s` = batch x new tokens / whole generate
time (prefill included), the same quantity measured for HF.

Each record times every `--decodes` mode (`SamplingConfig.decode`; default "layered", the
library's loop, then "stacked", the earlier one, as the in-run baseline) under a key of its name;
the record's main fields are the first mode's. Per mode, from the compiled HLO of this backend:
`loop_moves` (copies and slice-only fusions of >= 1 MiB inside the decode loops: per-step bytes
beyond the floor), and (tensor=1) `hlo_bytes_per_step`, XLA's bytes-accessed count of one decode
step compiled alone at the average context, beside `ideal_bytes_per_step` (weights + that KV).
XLA's count is its own model of each op's operands (on CPU it also counts the cache-prefix slices
the CPU backend materialises before its reductions, about 3x the KV bytes), so compare modes
rather than read it as traffic. `--breakdown` (tensor=1) times single "layered" steps reading the
full cache and 16 slots: the short step is about the weight-read time, the difference the KV-read
time. `--hlo-dir` keeps each compiled sampler's HLO text (gzip) for reading later.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import re
import sys
import time
import traceback

import numpy as np

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
  """Bytes of bf16 weights, the per-layer copy the "layered" loop slices before decoding, and a
  full bf16 KV cache of `slots` slots (what must sit in HBM)."""
  from real_jax.models import param_count
  return 2 * param_count(cfg) + weight_bytes_per_step(cfg) + batch * slots * kv_bytes_per_token(cfg)


def too_big(cfg, batch: int, slots: int, tensor: int, hbm_bytes: float) -> str | None:
  need = memory_needed(cfg, batch, slots) / tensor
  if need > 0.92 * hbm_bytes:
    return f"does not fit: needs {need / 2**30:.1f} GiB per GPU (weights + KV cache) of {hbm_bytes / 2**30:.1f}"
  return None


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8}
_INSTR = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* ([\w\-]+)\((.*)$")
_MOVE_OPS = {"parameter", "slice", "dynamic-slice", "bitcast", "copy", "transpose", "reshape", "constant", "tuple",
             "get-tuple-element", "broadcast"}


def _computations(txt: str) -> dict[str, list[str]]:
  comps, name = {}, None
  for line in txt.splitlines():
    m = re.match(r"^(?:ENTRY )?%([\w.\-]+) \(", line)
    if m and line.rstrip().endswith("{"):
      name = m.group(1)
      comps[name] = []
    elif line.startswith("}"):
      name = None
    elif name is not None:
      comps[name].append(line)
  return comps


def hlo_loop_moves(txt: str, min_bytes: int = 1 << 20) -> dict:
  """Data movement inside the decode loops of a compiled HLO text: copies and fusions that only
  slice / copy / transpose (no arithmetic) with an output of at least `min_bytes`.

  Each such op costs its output bytes twice (read + write) every iteration; in a decode loop they
  are bytes beyond the weights + KV-cache floor (for example a layer's weights sliced out of a
  stacked array every step, or a copy of a cache buffer). Decode loops are the while loops
  without a known trip count (a scan over layers has one). Counts each loop body once.
  Returns count, bytes, the largest few, and every op's element count (`elements`).
  """
  comps = _computations(txt)
  ops = {n: {m.group(4) for m in map(_INSTR.match, lines) if m} for n, lines in comps.items()}
  bodies = {m.group(1) for m in re.finditer(r"while\(.*body=%([\w.\-]+).*$", txt, re.M)
            if "known_trip_count" not in m.group(0)}
  found, seen = [], set()

  def visit(name):
    if name in seen or name not in comps:
      return
    seen.add(name)
    for line in comps[name]:
      m = _INSTR.match(line)
      called = re.findall(r"(?:to_apply|calls)=%([\w.\-]+)", line)
      if m is None:
        for c in called:  # tuple-shaped calls (e.g. command buffers): look inside
          visit(c)
        continue
      iname, dt, dims, op = m.group(1), m.group(2), m.group(3), m.group(4)
      if op in ("call", "async-start"):
        for c in called:
          visit(c)
        continue
      move = op == "copy" or (op == "fusion" and called and ops.get(called[0], {"?"}) <= _MOVE_OPS)
      if move and dt in _DTYPE_BYTES:
        elements = int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
        if elements * _DTYPE_BYTES[dt] >= min_bytes:
          found.append((elements * _DTYPE_BYTES[dt], elements, f"{iname}: {dt}[{dims}] {op}"))

  for b in sorted(bodies):
    visit(b)
  found.sort(reverse=True)
  return {"loops": len(bodies), "count": len(found), "bytes": int(sum(f[0] for f in found)),
          "largest": [f[2] for f in found[:6]], "elements": [f[1] for f in found]}


def _prefill_fn(graphdef, cfg, b, prompt, new, mode):
  """Prefill alone, as the sampler of `mode` runs it (weights sliced per layer, cache made)."""
  import jax
  from flax import nnx

  from real_jax._calls import compute_params
  from real_jax.models.transformer import KVCache, layer_arrays

  @jax.jit
  def prefill(state, toks, mask):
    m = nnx.merge(graphdef, compute_params(state, cfg.dtype))
    if mode == "layered":
      cache = KVCache.zeros(cfg, b, prompt + new - 1, per_layer=True)
      stacked = nnx.merge(graphdef, state).layers.arrays()
      lps = [compute_params(lp, cfg.dtype) for lp in layer_arrays(stacked, cfg.n_layers)]
      h, cache = m.hidden(toks, attention_mask_BT=mask, cache=cache, layer_params=lps)
    else:
      h, cache = m.hidden(toks, attention_mask_BT=mask, cache=KVCache.zeros(cfg, b, prompt + new))
    return m.project(h[:, -1:]), cache
  return prefill


def _step_fn(graphdef, cfg, mode, kv_len):
  """One decode step outside any loop: (state, layer params, cache, token, live) -> (logits, cache)."""
  import jax
  from flax import nnx

  def step(state, lps, cache, tok, live):
    m = nnx.merge(graphdef, state)
    kw = {"layer_params": lps, "kv_len": kv_len} if mode == "layered" else {"scan_layers": False}
    h, cache = m.hidden(tok[:, None], attention_mask_BT=live[:, None], cache=cache, **kw)
    return m.project(h)[:, 0], cache
  return jax.jit(step, donate_argnums=(2,))


def _step_inputs(graphdef, state, cfg, b, slots, index, mode, abstract):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from real_jax.models.transformer import KVCache, layer_arrays

  def make(state):
    m = nnx.merge(graphdef, state)
    lps = layer_arrays(m.layers.arrays(), cfg.n_layers) if mode == "layered" else None
    cache = KVCache.zeros(cfg, b, slots, per_layer=mode == "layered")
    cache = KVCache(cache.k, cache.v, jnp.arange(slots)[None, :].repeat(b, 0) < index, jnp.asarray(index, jnp.int32))
    return lps, cache
  if abstract:
    lps, cache = jax.eval_shape(make, state)
    return lps, cache, jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b,), bool)
  # On the state's mesh, as the step's outputs will be (else the second call compiles again).
  rep = jax.sharding.NamedSharding(jax.tree.leaves(state)[0].sharding.mesh, jax.sharding.PartitionSpec())
  lps, cache = jax.jit(make, out_shardings=rep)(state)
  return lps, cache, jax.device_put(jnp.full((b,), 3, jnp.int32), rep), jax.device_put(jnp.ones((b,), bool), rep)


def step_hlo(graphdef, state, cfg, b, slots, kv_len, mode) -> dict:
  """Compiled one-step cost: bytes accessed (XLA cost analysis) next to the weights + read-KV floor."""
  import jax
  lps, cache, tok, live = _step_inputs(graphdef, state, cfg, b, slots, kv_len - 1, mode, abstract=True)
  abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  c = _step_fn(graphdef, cfg, mode, kv_len).lower(abstract_state, lps, cache, tok, live).compile()
  cost = c.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  read = kv_len if mode == "layered" else slots
  return {"kv_len": kv_len, "hlo_bytes_per_step": float(cost.get("bytes accessed", float("nan"))),
          "ideal_bytes_per_step": float(weight_bytes_per_step(cfg) + b * kv_len * kv_bytes_per_token(cfg)),
          "kv_slots_read": read}


def step_breakdown(graphdef, state, cfg, b, slots, reps: int) -> dict:
  """Timed "layered" decode steps with a long and a short KV read: weight vs KV-read time per step."""
  import jax
  res = {}
  for tag, kv_len in (("kv_full", slots), ("kv_short", 16)):
    lps, cache, tok, live = _step_inputs(graphdef, state, cfg, b, slots, kv_len - 1, "layered", abstract=False)
    fn = _step_fn(graphdef, cfg, "layered", kv_len)
    logits, cache = fn(state, lps, cache, tok, live)
    jax.block_until_ready(logits)
    t = time.perf_counter()
    for _ in range(reps):
      logits, cache = fn(state, lps, cache, tok, live)
    jax.block_until_ready(logits)
    res[f"step_ms_{tag}"] = 1e3 * (time.perf_counter() - t) / reps
    res[f"kv_len_{tag}"] = kv_len
    del lps, cache, logits
  wb = weight_bytes_per_step(cfg)
  dkv = b * (slots - 16) * kv_bytes_per_token(cfg)
  short, full = res["step_ms_kv_short"] / 1e3, res["step_ms_kv_full"] / 1e3
  res["weights_bytes_per_s"] = wb / short  # upper bound on weight-read time: the short step is ~weights only
  res["kv_bytes_per_s"] = dkv / (full - short) if full > short else None
  return res


def read_bandwidth(gib: float = 2.0) -> float:
  """Bytes/s of a read-only pass (a sum over a bf16 array on device 0): decode mostly reads."""
  import jax
  import jax.numpy as jnp

  from bench._common import timed
  n = int(gib * 2**30) // 2
  x = jax.device_put(jnp.ones((n // 4096, 4096), jnp.bfloat16), jax.devices()[0])
  f = jax.jit(lambda a: jnp.sum(a, axis=0, dtype=jnp.float32))
  jax.block_until_ready(f(x))
  t, _ = timed(f, x, reps=10)
  del x
  return 2 * n / t


def run_jax(args, out: dict):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from bench._common import hbm_bandwidth, timed, write
  from real_jax.generation import SamplingConfig, sampler
  from real_jax.models import create_model, get_config
  from sharding import Layout

  if args.small:
    models, batches, tensors, prompt, new = ["tiny"], [8], [1, 4], 16, 8
    if args.only:
      models, batches, tensors = args.models, args.batches, args.tensors
  else:
    models, batches, tensors, prompt, new = args.models, args.batches, args.tensors, 256, 256
  modes = args.decodes
  bw = hbm_bandwidth(gib=0.25 if args.small else 2.0)
  out["hbm_bytes_per_s"] = bw
  bw_read = read_bandwidth(gib=0.25 if args.small else 2.0)
  out["hbm_read_bytes_per_s"] = bw_read
  out["decode_modes"] = modes
  out["decode_segments"] = args.segments
  hf = {}
  if args.hf_json and os.path.exists(args.hf_json):
    hf = {(r["model"], r["batch"]): r for r in json.load(open(args.hf_json))["hf"]}
  out.setdefault("generate", [])
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
      del model
      for b in batches:
        rec = {"model": name, "batch": b, "tensor": tensor, "prompt": prompt, "new_tokens": new,
               "decode": modes[0], "decode_segments": args.segments}
        h = hf.get((name, b))
        rec["hf_tokens_per_s"] = h.get("tokens_per_s") if (h and tensor == 1) else None
        if h and tensor == 1 and h.get("error"):
          rec["hf_note"] = h["error"]
        if tensor != 1:
          rec["hf_note"] = "HF generate measured on one GPU only (tensor=1 rows)"
        hbm = jax.devices()[0].memory_stats().get("bytes_limit", 80e9) if not args.small else 1e12
        reason = too_big(cfg, b, prompt + new, tensor, hbm)
        if time.perf_counter() - T0 > args.budget_s:
          reason = "not run: this run's time budget was spent"
        if reason:
          rec.update({"tokens_per_s": None, "roofline_fraction": None, "error": reason})
          out["generate"].append(rec)
          write(args.out, out)
          continue
        out["generate"].append(rec)
        rng = np.random.default_rng(0)
        toks = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(b, prompt)), jnp.int32)
        mask = jnp.ones((b, prompt), bool)
        avg_ctx = prompt + new / 2
        bytes_step = weight_bytes_per_step(cfg) + b * avg_ctx * kv_bytes_per_token(cfg)
        floor = bytes_step / (bw * tensor)
        floor_read = bytes_step / (bw_read * tensor)
        rec.update({"roofline_step_ms": 1e3 * floor, "bytes_per_step": bytes_step})
        for mode in modes:
          if time.perf_counter() - T0 > args.budget_s:
            rec[mode] = {"error": "not run: this run's time budget was spent"}
            continue
          try:
            sc = SamplingConfig(max_new_tokens=new, greedy=True, eos_id=None, bucket=prompt, decode=mode,
                                decode_segments=args.segments)
            t0 = time.perf_counter()
            fn = sampler(graphdef, state, (b, prompt), sc, layout)
            compiled = fn.lower(state, toks, mask, jax.random.key(0)).compile()
            compile_s = time.perf_counter() - t0
            txt = compiled.as_text()
            moves = hlo_loop_moves(txt)
            moves.pop("elements")
            if args.hlo_dir:
              os.makedirs(args.hlo_dir, exist_ok=True)
              with gzip.open(os.path.join(args.hlo_dir, f"generate_{name}_b{b}_t{tensor}_{mode}.hlo.txt.gz"),
                             "wt") as f:
                f.write(txt)
            del txt
            jax.block_until_ready(compiled(state, toks, mask, jax.random.key(0)).tokens)
            t, _ = timed(lambda: compiled(state, toks, mask, jax.random.key(0)).tokens, reps=args.reps)
            del compiled
            pre = _prefill_fn(graphdef, cfg, b, prompt, new, mode)
            jax.block_until_ready(pre(state, toks, mask))
            t_pre, _ = timed(pre, state, toks, mask, reps=3)
            del pre
            step = (t - t_pre) / (new - 1)
            r = {"tokens_per_s": b * new / t, "time_s": t, "prefill_s": t_pre, "decode_step_ms": 1e3 * step,
                 "roofline_fraction": floor / step, "roofline_fraction_read_bw": floor_read / step,
                 "compile_s": compile_s, "loop_moves": moves}
            if tensor == 1:
              try:
                r.update(step_hlo(graphdef, state, cfg, b, prompt + new - (mode == "layered"), int(avg_ctx), mode))
              except Exception as e:  # noqa: BLE001
                r["step_hlo_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rec[mode] = r
          except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rec[mode] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
          write(args.out, out)
          gc.collect()
        main = rec.get(modes[0], {})
        rec["tokens_per_s"] = main.get("tokens_per_s")
        rec["roofline_fraction"] = main.get("roofline_fraction")
        for k in ("time_s", "prefill_s", "decode_step_ms", "roofline_fraction_read_bw", "compile_s",
                  "hlo_bytes_per_step", "ideal_bytes_per_step"):
          if k in main:
            rec[k] = main[k]
        if "error" in main:
          rec["error"] = main["error"]
        if args.breakdown and tensor == 1 and time.perf_counter() - T0 < args.budget_s:
          try:
            rec["breakdown"] = step_breakdown(graphdef, state, cfg, b, prompt + new - 1, reps=args.breakdown_reps)
          except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rec["breakdown"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        write(args.out, out)
        gc.collect()
      del graphdef, state
      gc.collect()
  if args.consistency and not args.small and time.perf_counter() - T0 < args.budget_s:
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
  ap.add_argument("--only", default=None, metavar="MODEL:BATCH:TENSOR",
                  help="one case, e.g. 7b:64:1 (sets --models/--batches/--tensors; no bf16 consistency run)")
  ap.add_argument("--decodes", nargs="+", default=["layered", "stacked"], choices=["layered", "stacked"],
                  help="SamplingConfig.decode modes to time; the first gives the record's main numbers")
  ap.add_argument("--segments", type=int, default=4, help="SamplingConfig.decode_segments")
  ap.add_argument("--breakdown", action="store_true",
                  help="tensor=1: time single layered decode steps with a long and a short KV read")
  ap.add_argument("--breakdown-reps", type=int, default=20)
  ap.add_argument("--hlo-dir", default=None, help="write each compiled sampler's HLO text (gzip) here")
  ap.add_argument("--compile-cache", default=None, help="JAX persistent compilation cache directory")
  ap.add_argument("--reps", type=int, default=1)
  ap.add_argument("--budget-s", type=float, default=1e9, help="start no new case after this many seconds")
  args = ap.parse_args()
  args.consistency = args.only is None
  if args.only:
    try:
      m, b, t = args.only.split(":")
      args.models, args.batches, args.tensors = [m], [int(b)], [int(t)]
    except ValueError:
      ap.error(f"--only wants MODEL:BATCH:TENSOR, e.g. 7b:64:1; got {args.only!r}")
  if args.hf:
    return run_hf(args)
  if args.small:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if args.compile_cache:
    import jax
    jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  from bench._common import header
  out = header()
  run_jax(args, out)


if __name__ == "__main__":
  main()

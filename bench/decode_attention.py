"""Decode attention kernels timed alone: one query token per row against a per-layer KV cache.

    PYTHONPATH=$PWD python bench/decode_attention.py --out decode-attention.json   # GPU
    PYTHONPATH=$PWD python bench/decode_attention.py --small                       # CPU smoke

For each shape (rows B, cache slots S read, kv heads K, query heads per kv head G, head dim H) it
times `L` layers' worth of attention in one jitted call (each layer its own cache, as the layered
decode loop reads them) for each form: `reduce` (`transformer.decode_attention`, multiply-reduce,
the library's decode path), `dot` (`decode_attention_dot` below, two batched matmuls) and
`cudnn` (`jax.nn.dot_product_attention(implementation="cudnn")` on the cache with the new slot
already written; no fused own-token term), `fold` (`fold_decode_attention` below: the query heads of
each kv head folded into the query axis, cuDNN on GPU, XLA on CPU), `fused_len`
(`transformer.fused_decode_attention`, the library's GPU decode path: cuDNN given the filled length,
here all S + 1 slots) and `fused_len_half` (filled length about S / 2: does the kernel stop reading
there? Its time is compared against the full read, its output is not). Roofline: the K and V bytes read (2 x B x S x K x H x 2
bytes per layer) over the HBM bandwidth measured in the same run; `fraction` = roofline / time.
The forms are also checked against each other (max abs difference of the outputs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

SHAPES = {  # name: (B, S, K, G, H, L)
    "qwen2.5-0.5b-b256": (256, 511, 2, 7, 64, 24),
    "llama-7b-b64": (64, 511, 32, 1, 128, 32),
    "llama-1b-b256": (256, 511, 4, 8, 64, 16),
}


def decode_attention_dot(q_BTNH, k_BSKH, v_BSKH, mask_BTS, k_new_BTKH, v_new_BTKH):
  """`transformer.decode_attention` (T = 1, with the token's own key/value) written with two batched
  matmuls over (B, K) instead of multiply-reduce: the same math, fp32 scores, probabilities in the
  value dtype. Timed here as the `dot` form; not used by the library (cuDNN won on GPU)."""
  import jax.numpy as jnp
  b, t, n, h = q_BTNH.shape
  if t != 1:
    raise ValueError(f"decode_attention_dot: one query token, got T={t}")
  k = k_BSKH.shape[2]
  g = n // k
  f32 = jnp.float32
  scale = f32(1.0 / (h ** 0.5))
  q_BKGH = q_BTNH.reshape(b, k, g, h)
  s_BKGS = jnp.einsum("BKGH,BSKH->BKGS", q_BKGH, k_BSKH, preferred_element_type=f32) * scale
  s_BKGS = jnp.where(mask_BTS[:, :, None, :], s_BKGS, jnp.finfo(f32).min / 2)
  s_new_BKG = jnp.einsum("BKGH,BKH->BKG", q_BKGH.astype(f32), k_new_BTKH[:, 0].astype(f32)) * scale
  m_BKG = jnp.maximum(jnp.max(s_BKGS, axis=-1), s_new_BKG)
  e_BKGS = jnp.exp(s_BKGS - m_BKG[..., None])
  e_new_BKG = jnp.exp(s_new_BKG - m_BKG)
  denom_BKG = jnp.sum(e_BKGS, axis=-1) + e_new_BKG
  vdt = v_BSKH.dtype
  p_BKGS = (e_BKGS / denom_BKG[..., None]).astype(vdt)
  p_new_BKG = (e_new_BKG / denom_BKG).astype(vdt)
  o = jnp.einsum("BKGS,BSKH->BKGH", p_BKGS, v_BSKH, preferred_element_type=f32)
  o = o + p_new_BKG[..., None].astype(f32) * v_new_BTKH[:, 0, :, None, :].astype(f32)
  return o.reshape(b, 1, n, h).astype(q_BTNH.dtype)


def fold_decode_attention(q_B1NH, k_BSKH, v_BSKH, mask_BS, impl):
  """Fused attention of one query token per row with the G = N / K query heads of each kv head
  folded into the query axis (the kernel sees G query rows and K heads, so each (row, kv head) block
  reads its keys and values once). Timed as the `fold` form; slower than plain cuDNN on one H100 at
  Qwen2.5-0.5B's shape (66 against 44 us a layer), so not the library's path."""
  import jax
  import jax.numpy as jnp
  b, _, n, h = q_B1NH.shape
  s, k = k_BSKH.shape[1], k_BSKH.shape[2]
  g = n // k
  q_BGKH = q_B1NH.reshape(b, k, g, h).transpose(0, 2, 1, 3)  # query head n uses kv head n // G
  mask = jnp.broadcast_to(mask_BS[:, None, :], (b, g, s))[:, None]
  o_BGKH = jax.nn.dot_product_attention(q_BGKH, k_BSKH, v_BSKH, mask=mask, implementation=impl)
  return o_BGKH.transpose(0, 2, 1, 3).reshape(b, 1, n, h)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=None)
  ap.add_argument("--small", action="store_true")
  ap.add_argument("--reps", type=int, default=20)
  args = ap.parse_args()
  if args.small:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax
  import jax.numpy as jnp
  import numpy as np

  from bench._common import header, write
  from real_jax.models.transformer import decode_attention, fused_decode_attention

  out = header()
  x = jnp.ones((1 << 28,), jnp.bfloat16)
  cp = jax.jit(lambda a: a * 2)
  cp(x).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(10):
    y = cp(x)
  y.block_until_ready()
  hbm = 2 * x.nbytes * 10 / (time.perf_counter() - t0)
  del x, y
  out["hbm_bytes_per_s"] = hbm
  shapes = {"tiny": (8, 63, 2, 2, 16, 2)} if args.small else SHAPES
  out["records"] = []
  for name, (b, s, k, g, h, layers) in shapes.items():
    rng = np.random.default_rng(0)
    n = k * g
    q = jnp.asarray(rng.normal(size=(b, 1, n, h)), jnp.bfloat16)
    kn = jnp.asarray(rng.normal(size=(b, 1, k, h)), jnp.bfloat16)
    vn = jnp.asarray(rng.normal(size=(b, 1, k, h)), jnp.bfloat16)
    # Slot S of every cache holds the new key/value (written, as the decode step does before cuDNN).
    ks = [jnp.concatenate([jnp.asarray(rng.normal(size=(b, s, k, h)), jnp.bfloat16), kn], 1) for _ in range(layers)]
    vs = [jnp.concatenate([jnp.asarray(rng.normal(size=(b, s, k, h)), jnp.bfloat16), vn], 1) for _ in range(layers)]
    valid = rng.random((b, s)) < 0.9
    mask = jnp.asarray(valid[:, None, :])
    full_mask = jnp.asarray(np.concatenate([valid, np.ones((b, 1), bool)], 1)[:, None, None, :])

    def run_reduce(q, ks, vs, mask, kn, vn):
      return [decode_attention(q, kk[:, :s], vv[:, :s], mask, kn, vn) for kk, vv in zip(ks, vs)]

    def run_dot(q, ks, vs, mask, kn, vn):
      return [decode_attention_dot(q, kk[:, :s], vv[:, :s], mask, kn, vn) for kk, vv in zip(ks, vs)]

    def run_cudnn(q, ks, vs, mask, kn, vn):
      del mask, kn, vn
      return [jax.nn.dot_product_attention(q, kk, vv, mask=full_mask, implementation="cudnn") for kk, vv in zip(ks, vs)]

    full_mask_BS = full_mask[:, 0, 0, :]
    impl = "cudnn" if jax.default_backend() == "gpu" else "xla"

    def run_fold(q, ks, vs, mask, kn, vn):
      del mask, kn, vn
      return [fold_decode_attention(q, kk, vv, full_mask_BS, impl) for kk, vv in zip(ks, vs)]

    def run_fused(q, ks, vs, mask, kn, vn, kv_len=None):
      del mask, kn, vn
      return [fused_decode_attention(q, kk, vv, full_mask_BS, kv_len, impl) for kk, vv in zip(ks, vs)]

    forms = {"reduce": run_reduce, "dot": run_dot}
    if jax.default_backend() == "gpu":
      forms["cudnn"] = run_cudnn
    forms["fold"] = run_fold
    forms["fused_len"] = lambda *a: run_fused(*a, kv_len=jnp.int32(s + 1))
    forms["fused_len_half"] = lambda *a: run_fused(*a, kv_len=jnp.int32(s // 2 + 1))
    kv_bytes = 2 * b * s * k * h * 2 * layers
    rec = {"shape": name, "B": b, "S": s, "K": k, "G": g, "H": h, "layers": layers, "kv_bytes": kv_bytes,
           "roofline_s": kv_bytes / hbm}
    results = {}
    for form, fn in forms.items():
      try:
        f = jax.jit(fn)
        o = f(q, ks, vs, mask, kn, vn)
        jax.block_until_ready(o)
        times = []
        for _ in range(args.reps):
          t0 = time.perf_counter()
          jax.block_until_ready(f(q, ks, vs, mask, kn, vn))
          times.append(time.perf_counter() - t0)
        t = float(np.median(times))
        results[form] = np.asarray(o[0], np.float32)
        rec[form] = {"s": t, "per_layer_us": t / layers * 1e6, "fraction": rec["roofline_s"] / t}
        print(f"[decode_attention] {name} {form}: {t / layers * 1e6:.1f} us/layer, "
              f"{rec['roofline_s'] / t:.2f} of roofline", flush=True)
      except Exception as e:  # noqa: BLE001
        rec[form] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"[decode_attention] {name} {form}: {rec[form]['error']}", flush=True)
    if "reduce" in results and "dot" in results:
      rec["max_abs_diff_dot_vs_reduce"] = float(np.abs(results["dot"] - results["reduce"]).max())
    if "reduce" in results and "fold" in results:
      rec["max_abs_diff_fold_vs_reduce"] = float(np.abs(results["fold"] - results["reduce"]).max())
      rec["max_abs_diff_fused_len_vs_reduce"] = float(np.abs(results["fused_len"] - results["reduce"]).max())
    out["records"].append(rec)
    write(args.out, out)
  write(args.out, out)


if __name__ == "__main__":
  main()

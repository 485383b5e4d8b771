"""One decode step's token draw timed alone: `generation.sample_token` on [B, V] fp32 logits.

    PYTHONPATH=$PWD python bench/sampling.py --out sampling.json   # GPU
    PYTHONPATH=$PWD python bench/sampling.py --small               # CPU smoke

Forms per shape (rows B, vocabulary V): `categorical` (`jax.random.categorical` over the whole row:
V threefry Gumbel draws a row, the library's draw before the two-level one), `two_level`
(`generation.two_level_categorical`: each chunk's logsumexp, then a chunk and a token inside it),
`greedy` (argmax over the whole row), each with the token's log-prob from a whole-row logsumexp;
then the library's `sample_token` (plain draw, and greedy), whose row reductions all run in two
levels over `vocab_chunk` chunks. Roofline: one read of the fp32 logits (4 x B x V bytes) at the HBM bandwidth measured
in the same run; `fraction` = roofline / time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

SHAPES = {"qwen2.5-0.5b-b256": (256, 151936), "llama-7b-b64": (64, 32000)}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=None)
  ap.add_argument("--small", action="store_true")
  ap.add_argument("--reps", type=int, default=50)
  args = ap.parse_args()
  if args.small:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax
  import jax.numpy as jnp
  import numpy as np

  from bench._common import hbm_bandwidth, header, write
  from real_jax.generation import SamplingConfig, sample_token, two_level_categorical, vocab_chunk

  out = header()
  out["hbm_bytes_per_s"] = hbm = hbm_bandwidth(gib=0.25 if args.small else 2.0)
  out["records"] = []

  def with_logprob(draw):
    def f(key, x):
      tok = draw(key, x).astype(jnp.int32)
      return tok, jnp.take_along_axis(x, tok[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(x, axis=-1)
    return f

  for name, (b, v) in ({"tiny": (8, 256)} if args.small else SHAPES).items():
    c = vocab_chunk(v)
    forms = {"categorical": with_logprob(lambda k, x: jax.random.categorical(k, x, axis=-1)),
             "two_level": with_logprob(lambda k, x, c=c: two_level_categorical(k, x, c)),
             "greedy": with_logprob(lambda k, x: jnp.argmax(x, axis=-1)),
             "sample_token": lambda k, x: sample_token(k, x, SamplingConfig(max_new_tokens=1)),
             "sample_token_greedy": lambda k, x: sample_token(k, x, SamplingConfig(max_new_tokens=1, greedy=True))}
    x = jnp.asarray(np.random.default_rng(0).normal(size=(b, v)) * 2, jnp.float32)
    roof = 4 * b * v / hbm
    rec = {"shape": name, "B": b, "V": v, "chunk": c, "roofline_s": roof}
    for form, fn in forms.items():
      f = jax.jit(fn)
      jax.block_until_ready(f(jax.random.key(0), x))
      t0 = time.perf_counter()
      for i in range(args.reps):
        r = f(jax.random.key(i), x)
      jax.block_until_ready(r)
      t = (time.perf_counter() - t0) / args.reps
      rec[form] = {"s": t, "fraction": roof / t}
      print(f"[sampling] {name} {form}: {t * 1e6:.1f} us, {roof / t:.2f} of roofline", flush=True)
    out["records"].append(rec)
  write(args.out, out)


if __name__ == "__main__":
  main()

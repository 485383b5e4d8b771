"""The embedded default until the RLHF runtime lands: a tiny model sharded over all devices, greedy tokens.

    python -m real_jax.demo [--layout d1f4t2] [--new-tokens 8]

On a CPU-only machine, run it with 8 fake devices:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python -m real_jax.demo
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from real_jax.models import KVCache, create_model, get_config
from sharding import DeviceMesh, Layout, Strategy


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--layout", default=None, help="strategy like d1f4t2 over all devices (default: fsdp x tensor=2)")
  ap.add_argument("--new-tokens", type=int, default=8)
  args = ap.parse_args(argv)
  n = jax.device_count()
  strategy = Strategy.parse(args.layout) if args.layout else Strategy(fsdp=max(n // 2, 1), tensor=min(n, 2))
  layout = Layout(DeviceMesh(0, n), strategy)
  cfg = get_config("tiny")
  model = create_model(cfg, layout, seed=0)
  print(f"tiny model ({sum(x.size for x in jax.tree.leaves(nnx.state(model)))} params) on {layout}: "
        f"wq sharded as {model.layers.wq.get_value().sharding.spec}")
  prompt = jnp.asarray(np.arange(1, 1 + 2 * 6, dtype=np.int32).reshape(2, 6) % cfg.vocab_size)

  @nnx.jit
  def step(model, tokens, cache):
    logits, cache = model.forward(tokens, cache=cache)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

  cache = KVCache.zeros(cfg, prompt.shape[0], prompt.shape[1] + args.new_tokens)
  nxt, cache = step(model, prompt, cache)
  out = [nxt]
  for _ in range(args.new_tokens - 1):
    nxt, cache = step(model, nxt[:, None], cache)
    out.append(nxt)
  gen = np.stack([np.asarray(x) for x in out], axis=1)
  for p, g in zip(np.asarray(prompt), gen):
    print(f"prompt {p.tolist()} -> greedy {g.tolist()}")


if __name__ == "__main__":
  main()

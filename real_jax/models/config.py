"""Model configuration: one frozen dataclass for the LLaMA family, with presets.

Shape legend used across `real_jax/models` (suffixes on array names, letters in einsums):
  B batch, T tokens (query length), S key/cache length, D embed (d_model), N query heads,
  K kv heads, H head dim, G query heads per kv head (N // K), F mlp hidden, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """LLaMA-3.1 style frequency-dependent RoPE scaling (`rope_type: llama3` in HF configs)."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a LLaMA-family decoder (LLaMA 2/3, Qwen2/2.5, Mistral).

  Attributes:
    family: "llama", "qwen2" or "mistral" (used for HF export; the math is shared).
    vocab_size: V.
    d_model: D, the residual width.
    n_layers: L.
    n_heads: N, query heads.
    n_kv_heads: K, key/value heads (K == N: multi-head; K < N: grouped-query attention).
    head_dim: H.
    d_ff: F, SwiGLU hidden width.
    rms_eps: epsilon of every RMSNorm.
    rope_theta: RoPE base.
    rope_scaling: None or LLaMA-3.1 scaling.
    qkv_bias: biases on the q/k/v projections (Qwen2).
    tie_embeddings: the LM head reuses the embedding matrix.
    max_seq_len: longest sequence the model is meant for (checked by generation).
    dtype: compute dtype of activations ("float32" or "bfloat16").
    param_dtype: storage dtype of parameters (fp32 master weights for mixed precision).
    remat: rematerialisation of each layer in training: "none", "full" or "dots"
      (save matmul outputs, recompute the rest).
    attention_impl: None (cuDNN flash attention for bf16 on GPU, XLA otherwise or where cuDNN
      does not apply), "xla" or "cudnn".
    logits_chunk: sequence positions per chunk when log-probs are computed from the LM head
      (`Transformer.token_logprobs`, used by inference and every policy loss): the [B, T, V]
      float32 logits are never whole in memory, only [B, chunk, V] at a time, recomputed in the
      backward pass. 0 (auto): chunks of at most 2^29 logits per device (2 GiB in float32), one
      chunk when the whole [B, T, V] is smaller.
    unroll_layers: full-sequence passes (training, inference, prefill) unroll the layer loop
      (True, the default) or scan it (False: one layer traced, faster compiles). Scanning copies
      every layer's saved activations into and out of stacked buffers: on one H100 a Qwen2.5-0.5B
      train step (64 x 512 tokens, 2 micro-batches) took 392 ms scanned, 74 ms of it in memcpy,
      and 296 ms unrolled (compile 10 s vs 13 s; bench/results/train-qwen-h100.json).
  """

  vocab_size: int = 256
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 2
  head_dim: int = 16
  d_ff: int = 128
  rms_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  qkv_bias: bool = False
  tie_embeddings: bool = False
  max_seq_len: int = 2048
  family: str = "llama"
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  attention_impl: str | None = None
  logits_chunk: int = 0
  unroll_layers: bool = True

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {v!r}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"ModelConfig.n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")
    if self.family not in ("llama", "qwen2", "mistral"):
      raise ValueError(f"ModelConfig.family={self.family!r}: expected 'llama', 'qwen2' or 'mistral'")
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"ModelConfig.remat={self.remat!r}: expected 'none', 'full' or 'dots'")
    if not isinstance(self.logits_chunk, int) or isinstance(self.logits_chunk, bool) or self.logits_chunk < 0:
      raise ValueError(f"ModelConfig.logits_chunk must be an int >= 0 (0: auto), got {self.logits_chunk!r}")
    if not isinstance(self.unroll_layers, bool):
      raise ValueError(f"ModelConfig.unroll_layers must be True or False, got {self.unroll_layers!r}")
    if self.attention_impl not in (None, "xla", "cudnn"):
      raise ValueError(f"ModelConfig.attention_impl={self.attention_impl!r}: expected None, 'xla' or 'cudnn'")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16"):
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: expected 'float32' or 'bfloat16'")

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)


def param_count(cfg: ModelConfig, head: str = "lm") -> int:
  """Number of parameters, counted like HF's safetensors (so it matches published counts).

  head: "lm" (embedding + LM head, shared when tied) or "scalar" (embedding + a D-vector score).
  """
  d, f, n, k, h, v, l = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size, cfg.n_layers
  attn = d * n * h + 2 * d * k * h + n * h * d
  if cfg.qkv_bias:
    attn += n * h + 2 * k * h
  layer = attn + 3 * d * f + 2 * d
  total = l * layer + d + v * d
  if head == "lm":
    total += 0 if cfg.tie_embeddings else d * v
  elif head == "scalar":
    total += d
  else:
    raise ValueError(f"head={head!r}: expected 'lm' or 'scalar'")
  return total


def _llama2(d, l, n, f, k=None, v=32000, theta=10000.0, eps=1e-5):
  return ModelConfig(vocab_size=v, d_model=d, n_layers=l, n_heads=n, n_kv_heads=k or n, head_dim=d // n, d_ff=f,
                     rms_eps=eps, rope_theta=theta, max_seq_len=4096)


def _qwen25(d, l, n, k, f, tied, v=151936):
  return ModelConfig(vocab_size=v, d_model=d, n_layers=l, n_heads=n, n_kv_heads=k, head_dim=d // n, d_ff=f,
                     rms_eps=1e-6, rope_theta=1e6, qkv_bias=True, tie_embeddings=tied, max_seq_len=32768,
                     family="qwen2")


# Presets. The "7b", "13b", "70b" shapes are LLaMA-2's; "34b" is Code Llama 34B's (the LLaMA-34B shape
# the ReaL paper uses); "1b" is LLaMA-3.2-1B's; "125m", "350m" and "1.3b" are LLaMA-shaped models of
# OPT-like widths and depths (no published counterpart; "350m" is about 341M with a scalar head and 374M
# with an LM head, "1.3b" about 1.35B with an LM head; checked in tests/test_bench_plans.py). Published
# parameter counts are checked in tests/test_models.py.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    "125m": _llama2(768, 12, 12, 2048),
    "350m": _llama2(1024, 24, 16, 2816),
    "1.3b": _llama2(2048, 24, 32, 5504),
    "1b": ModelConfig(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                      d_ff=8192, rms_eps=1e-5, rope_theta=500000.0, tie_embeddings=True, max_seq_len=131072,
                      rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192)),
    "7b": _llama2(4096, 32, 32, 11008),
    "13b": _llama2(5120, 40, 40, 13824),
    "34b": _llama2(8192, 48, 64, 22016, k=8, theta=1e6),
    "70b": _llama2(8192, 80, 64, 28672, k=8),
    "qwen2.5-0.5b": _qwen25(896, 24, 14, 2, 4864, True),
    "qwen2.5-1.5b": _qwen25(1536, 28, 12, 2, 8960, True),
    "qwen2.5-7b": _qwen25(3584, 28, 28, 4, 18944, False, v=152064),
}


def get_config(name: str, **overrides) -> ModelConfig:
  """A preset by name, with field overrides: `get_config("7b", dtype="bfloat16")`."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return dataclasses.replace(PRESETS[name], **overrides)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs per token (2 per multiply-add) of a causal pass over `seq_len` tokens.

  Dense: every weight matrix once (LM head included). Attention: QK^T and PV against on average
  seq_len / 2 keys, i.e. 2 * 2 * N * H * seq_len / 2 per layer.
  """
  d, f, n, k, h, l, v = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers, cfg.vocab_size
  dense = l * (2 * d * n * h + 2 * d * k * h + 3 * d * f) + d * v
  attn = l * 2 * n * h * seq_len
  return 2.0 * dense + attn

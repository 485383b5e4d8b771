"""Optimizer configuration: AdamW with warm-up + decay and global-norm clipping (optax)."""

from __future__ import annotations

import dataclasses

import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with a learning-rate schedule and global-norm gradient clipping.

  lr: peak learning rate. warmup_steps: linear warm-up from 0 to lr over this many steps.
  decay: "cosine", "linear" or "constant" after warm-up. decay_steps: steps of the decay (after
    warm-up); the rate then stays at lr * end_lr_ratio. b1, b2, eps, weight_decay: AdamW's.
  clip_norm: global-norm clip applied to the accumulated gradient (None: off).
  """

  lr: float = 1e-5
  warmup_steps: int = 0
  decay_steps: int = 1000
  decay: str = "cosine"
  end_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.0
  clip_norm: float | None = 1.0

  def __post_init__(self):
    if self.decay not in ("cosine", "linear", "constant"):
      raise ValueError(f"OptimizerConfig.decay={self.decay!r}: expected 'cosine', 'linear' or 'constant'")
    if self.lr < 0 or self.warmup_steps < 0 or self.decay_steps < 1:
      raise ValueError(f"OptimizerConfig: need lr >= 0, warmup_steps >= 0, decay_steps >= 1, got {self}")


def lr_schedule(cfg: OptimizerConfig) -> optax.Schedule:
  """Step -> learning rate: linear warm-up 0 -> lr, then cosine / linear decay to lr * end_lr_ratio."""
  end = cfg.lr * cfg.end_lr_ratio
  if cfg.decay == "cosine":
    decay = optax.cosine_decay_schedule(cfg.lr, cfg.decay_steps, alpha=cfg.end_lr_ratio)
  elif cfg.decay == "linear":
    decay = optax.linear_schedule(cfg.lr, end, cfg.decay_steps)
  else:
    decay = optax.constant_schedule(cfg.lr)
  if cfg.warmup_steps == 0:
    return decay
  warm = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
  return optax.join_schedules([warm, decay], [cfg.warmup_steps])


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  """clip_by_global_norm (if set) then AdamW with `lr_schedule(cfg)`."""
  adam = optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  if cfg.clip_norm is None:
    return adam
  return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adam)

"""Name -> function registries for the RLHF math: advantages, losses and KL estimators.

Configs pick an algorithm's pieces by name (`PPOConfig.kl_estimator="k3"`); the runtime resolves
the name once, when the config is read, with `get_advantage` / `get_loss` / `get_kl`:

  @register_advantage("gae")
  def gae_advantages(token_rewards, values, mask, *, gamma, lam): ...

  fn = get_advantage("gae")

Signatures are per family, not uniform across the whole registry (GAE needs values, GRPO needs a
group size); each function documents its own. The conventions they share:
  * per-token arrays are [B, T] float32, aligned to response tokens; `mask` is 1.0 on response tokens;
  * static hyperparameters are keyword-only, so `functools.partial(fn, clip_eps=0.2)` is jittable;
  * losses return `(loss_scalar, stats)` with `stats` a dict of scalar arrays (no host syncs);
  * KL estimators map `(logprobs, ref_logprobs) -> per-token [B, T]`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


class Registry:
  """A named table of functions with loud errors for unknown or duplicate names."""

  def __init__(self, kind: str):
    self.kind = kind
    self._fns: dict[str, Callable] = {}

  def register(self, name: str) -> Callable[[F], F]:
    if not isinstance(name, str) or not name:
      raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

    def deco(fn: F) -> F:
      if name in self._fns and self._fns[name] is not fn:
        raise ValueError(f"{self.kind} {name!r} is already registered (by {self._fns[name].__qualname__})")
      self._fns[name] = fn
      return fn

    return deco

  def get(self, name: str) -> Callable:
    try:
      return self._fns[name]
    except KeyError:
      raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._fns)) or '(none)'}") from None

  def names(self) -> tuple[str, ...]:
    return tuple(sorted(self._fns))

  def __contains__(self, name: object) -> bool:
    return name in self._fns


ADVANTAGES = Registry("advantage")
LOSSES = Registry("loss")
KL_ESTIMATORS = Registry("kl estimator")

register_advantage = ADVANTAGES.register
register_loss = LOSSES.register
register_kl = KL_ESTIMATORS.register
get_advantage = ADVANTAGES.get
get_loss = LOSSES.get
get_kl = KL_ESTIMATORS.get
list_advantages = ADVANTAGES.names
list_losses = LOSSES.names
list_kls = KL_ESTIMATORS.names

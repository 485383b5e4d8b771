"""LLaMA-family decoders (LLaMA 2/3, Qwen2/2.5, Mistral) with logical-axis parameters.

Shape legend (array-name suffixes and einsum letters): B batch, T tokens, S key/cache slots,
D embed, N query heads, K kv heads, H head dim, G heads per kv head, F mlp hidden, V vocab, L layers.
"""

from real_jax.models.config import PRESETS, ModelConfig, RopeScaling, flops_per_token, get_config, param_count
from real_jax.models.transformer import (KVCache, Transformer, abstract_model, activation_constraints, create_model,
                                         param_shardings)

__all__ = [
    "KVCache", "ModelConfig", "PRESETS", "RopeScaling", "Transformer", "abstract_model", "activation_constraints",
    "create_model", "flops_per_token", "get_config", "param_count", "param_shardings",
]
from real_jax.models.hf import config_from_hf, config_to_hf, load_pretrained, save_pretrained  # noqa: E402

__all__ += ["config_from_hf", "config_to_hf", "load_pretrained", "save_pretrained"]

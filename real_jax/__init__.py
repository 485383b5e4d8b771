"""real_jax: RLHF training of large language models in JAX with parameter reallocation.

What runs: models, generation, algorithms, dataflow, runtime, data, checkpoints, CLI.
"""

__version__ = "0.1.0"

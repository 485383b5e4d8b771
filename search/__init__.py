"""Which plan: execution plans, the cost estimator, the simulator and the plan search.

Receives lowerable descriptions of calls from `real_jax` and returns plans; knows nothing of Flax
modules (DESIGN.md section 1). Filled in by the search issue.
"""

__all__: list[str] = []

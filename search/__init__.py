"""Which plan: execution plans, the cost estimator, the simulator and the plan search.

Receives lowerable descriptions of calls from `real_jax` and returns plans; knows nothing of Flax
modules (DESIGN.md section 1).
"""

from search.plan import ExecutionPlan, layout_from_text, layout_to_text

__all__ = ["ExecutionPlan", "layout_from_text", "layout_to_text"]

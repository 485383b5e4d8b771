"""Which plan: execution plans, the cost estimator, the simulator and the plan search.

Receives lowerable descriptions of calls (`CallSpec`) from `real_jax` and returns plans; knows
nothing of Flax modules (DESIGN.md section 1). Method and measured errors: search/README.md.
"""

from search.estimator import CallCost, CallSpec, Estimator, ModelShape
from search.plan import ExecutionPlan, layout_from_text, layout_to_text
from search.profile import Profile

__all__ = ["CallCost", "CallSpec", "Estimator", "ExecutionPlan", "ModelShape", "Profile", "layout_from_text",
           "layout_to_text"]

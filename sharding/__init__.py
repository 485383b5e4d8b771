"""Where state lives: device meshes, logical-axis rules, and reallocation between layouts.

Knows nothing of models or RLHF (DESIGN.md section 1).
"""

from sharding.mesh import AXES, DeviceMesh, Layout, Strategy, make_mesh, strategies, submeshes
from sharding.rules import (ACTIVATION_RULES, PARAM_RULES, activation_sharding, check_rules, logical_axes_of,
                            shardings_for, spec_for)

__all__ = [
    "ACTIVATION_RULES", "AXES", "DeviceMesh", "Layout", "PARAM_RULES", "Strategy", "activation_sharding",
    "check_rules", "logical_axes_of", "make_mesh", "shardings_for", "spec_for", "strategies", "submeshes",
]

from sharding.hardware import Hardware  # noqa: E402
from sharding.realloc import DEFAULT_BUCKET_BYTES, realloc_cost, reallocate  # noqa: E402

__all__ += ["DEFAULT_BUCKET_BYTES", "Hardware", "realloc_cost", "reallocate"]

"""The runtime: executes a dataflow graph under an ExecutionPlan (engine) and the training loop."""

from real_jax.runtime.engine import Engine, ModelSlot, Record, home_layouts
from real_jax.runtime.loop import resolve_plan, run
from real_jax.runtime.ppo import PPOProgram, ppo_graph

__all__ = ["Engine", "ModelSlot", "PPOProgram", "Record", "home_layouts", "ppo_graph", "resolve_plan", "run"]

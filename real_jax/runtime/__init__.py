"""The runtime: executes a dataflow graph under an ExecutionPlan (engine), the algorithm programs and the
training loop.

Programs (`config.algorithm`): ppo (`ppo`), grpo / rloo / remax (`policy_gradient`), dpo / sft / rm
(`offline`); `get_program(name)` returns the class, `register_program` adds one.
"""

from real_jax.runtime.engine import Engine, ModelSlot, Record, home_layouts
from real_jax.runtime.loop import IterationCallback, RunState, resolve_plan, run
from real_jax.runtime.offline import DPOProgram, RewardModelProgram, SFTProgram
from real_jax.runtime.policy_gradient import GRPOProgram, ReMaxProgram, RLOOProgram
from real_jax.runtime.ppo import PPOProgram, ppo_graph
from real_jax.runtime.program import Program
from real_jax.runtime.registry import get_program, list_programs, register_program

__all__ = ["DPOProgram", "Engine", "GRPOProgram", "IterationCallback", "ModelSlot", "PPOProgram", "Program",
           "RLOOProgram", "ReMaxProgram", "Record", "RewardModelProgram", "RunState", "SFTProgram", "get_program",
           "home_layouts", "list_programs", "ppo_graph", "register_program", "resolve_plan", "run"]

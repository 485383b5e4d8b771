"""Worker for tests/test_runtime_multiprocess.py::test_searched_plan_is_process_0s.

Each process starts from a different plan (as MCMC under a time budget may find); after
`agree_across_processes` every process prints the plan it will run: "PLAN <process> <inline plan>".
"""

from _mp_launch import exit_on_error, init_worker

pid, nproc = init_worker()

from real_jax.runtime.loop import agree_across_processes  # noqa: E402
from search.plan import ExecutionPlan  # noqa: E402


def main():
  # Plans of different lengths per process: the broadcast must not assume equal sizes.
  mine = ExecutionPlan.parse(f"actor_gen=0:{8 >> pid}/d{8 >> pid}f1t1, actor_train=0:8/d1f8t1" +
                             (", critic_inf=4:4/d1f2t2m2" if pid else ""))
  agreed = agree_across_processes(mine)
  print(f"PLAN {pid} {agreed.to_dict()}", flush=True)
  print(f"RESULT process={pid} ok", flush=True)


exit_on_error(main)

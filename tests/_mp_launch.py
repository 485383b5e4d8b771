"""Runs a Python script as N cooperating JAX processes on localhost (CPU devices, jax.distributed).

In the test (parent):

    results = launch("tests/_ckpt_mp_worker.py", ["save", workdir], num_processes=2, devices_per_process=4)
    for r in results: assert r.returncode == 0, r.output

In the worker, before anything touches a JAX backend:

    from _mp_launch import init_worker
    init_worker()   # sets CPU devices, gloo collectives, cross-host transfer sockets; jax.distributed

num_processes=1 runs one plain process with all the devices (no jax.distributed), so the same
worker serves the "1 process x 8 devices" side of a comparison.

Flags (as tests/_realloc_mp_worker.py found they work on CPU): `jax_cpu_collectives_implementation=
gloo` (collectives across processes), `jax_force_dcn_cross_host_transfers` and one
`jax_cross_host_transfer_socket_address` per process (device_put between processes). Ports: the
coordinator at `port`, process i's transfer socket at `port + 1 + i`.

Hangs: a process that dies leaves the others blocked in a barrier; as soon as one exits non-zero
the rest are killed, and everything is killed at `timeout`. Output goes to files, not pipes.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV_PREFIX = "REAL_JAX_MP_"


SIBLING_GRACE_S = 20.0


@dataclasses.dataclass
class Result:
  process_id: int
  returncode: int | None  # None: killed because it hung or a sibling failed.
  output: str


def free_ports(n: int) -> int:
  """A port p with p .. p + n - 1 all free on 127.0.0.1 right now."""
  for _ in range(100):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      base = s.getsockname()[1]
    if base + n >= 65535:
      continue
    socks = []
    try:
      for k in range(n):
        s = socket.socket()
        socks.append(s)
        s.bind(("127.0.0.1", base + k))
      return base
    except OSError:
      continue
    finally:
      for s in socks:
        s.close()
  raise RuntimeError(f"no {n} consecutive free ports on 127.0.0.1")


def launch(script: str | os.PathLike, args: list[str], *, num_processes: int, devices_per_process: int,
           timeout: float = 180.0) -> list[Result]:
  """Runs `script args` as `num_processes` processes; returns one Result per process, in order."""
  port = free_ports(num_processes + 1)
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS") and
         not k.startswith(ENV_PREFIX) and not k.startswith("PYTEST_")}
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
  env["PYTHONHASHSEED"] = "0"
  logdir = tempfile.mkdtemp(prefix="mp_launch_")
  procs, logs = [], []
  for pid in range(num_processes):
    penv = dict(env, **{f"{ENV_PREFIX}PROCESS_ID": str(pid), f"{ENV_PREFIX}NUM_PROCESSES": str(num_processes),
                        f"{ENV_PREFIX}PORT": str(port), f"{ENV_PREFIX}DEVICES": str(devices_per_process)})
    log = open(os.path.join(logdir, f"process{pid}.log"), "w+")
    logs.append(log)
    procs.append(subprocess.Popen([sys.executable, str(script), *map(str, args)], env=penv, stdout=log,
                                  stderr=subprocess.STDOUT, cwd=str(ROOT)))
  deadline = time.monotonic() + timeout
  killed = set()
  failed_at = None
  try:
    while any(p.poll() is None for p in procs):
      if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
        failed_at = time.monotonic()
      # A sibling failed: the others get SIBLING_GRACE_S to finish on their own (they often fail the
      # same way, a moment later on a loaded machine) before they are killed as hung.
      now = time.monotonic()
      if (failed_at is not None and now - failed_at > SIBLING_GRACE_S) or now > deadline:
        for i, p in enumerate(procs):
          if p.poll() is None:
            p.kill()
            killed.add(i)
        break
      time.sleep(0.2)
    for p in procs:
      p.wait(timeout=30)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  results = []
  for pid, (p, log) in enumerate(zip(procs, logs)):
    log.seek(0)
    out = log.read()
    log.close()
    if pid in killed:
      out += f"\n[mp_launch: process {pid} killed (hung past {timeout}s or a sibling failed)]"
    results.append(Result(pid, None if pid in killed else p.returncode, out))
  return results


def exit_on_error(main) -> None:
  """Runs `main()`; on an exception prints it and exits at once with status 1 (a plain raise can
  leave the process waiting on JAX/orbax threads, and its siblings in a barrier)."""
  import traceback
  try:
    main()
  except BaseException:  # noqa: BLE001
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def init_worker() -> tuple[int, int]:
  """In a launched process: configures JAX from the launcher's environment; returns (process_id, n)."""
  pid = int(os.environ[f"{ENV_PREFIX}PROCESS_ID"])
  n = int(os.environ[f"{ENV_PREFIX}NUM_PROCESSES"])
  port = int(os.environ[f"{ENV_PREFIX}PORT"])
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={os.environ[f'{ENV_PREFIX}DEVICES']}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")
  if n > 1:
    jax.config.update("jax_force_dcn_cross_host_transfers", True)
    jax.config.update("jax_cross_host_transfer_socket_address", f"127.0.0.1:{port + 1 + pid}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=n, process_id=pid,
                               initialization_timeout=60)
  return pid, n

"""reallocate across processes: 2 processes x 4 CPU devices on localhost (jax.distributed).

Was flaky (xfail): a batched `jax.device_put` with several cross-process arrays pairs the sender's
and receiver's buffers in an order that differs between processes, so shards arrived on the wrong
devices (wrong values) and a later size mismatch hung. reallocate now sends one buffer per call
across processes, in the same global order on every process.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port():
  # Needs 3 consecutive ports: coordinator, and one cross-host transfer socket per process.
  for _ in range(50):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    if port < 65000:
      return port
  raise RuntimeError("no free port")


def test_two_processes(tmp_path):
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  logs = [open(tmp_path / f"worker{i}.log", "w+") for i in range(2)]  # Files, not pipes: no deadlock.
  procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "_realloc_mp_worker.py"), str(i), str(port)],
                            env=env, stdout=logs[i], stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  deadline = time.monotonic() + 150  # ~15 s when healthy; a hang is killed, not waited for.
  try:
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    hung = [i for i, p in enumerate(procs) if p.poll() is None]
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outs = []
  for log in logs:
    log.seek(0)
    outs.append(log.read())
    log.close()
  assert not hung, f"processes {hung} hung:\n" + "\n".join(o[-3000:] for o in outs)
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
    assert f"RESULT process={i} ok=18" in out, out[-2000:]

"""Worker for tests/test_realloc_multiprocess.py: one of 2 processes x 4 CPU devices."""

import math
import os
import sys

pid, port = int(sys.argv[1]), int(sys.argv[2])
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_force_dcn_cross_host_transfers", True)
jax.config.update("jax_cross_host_transfer_socket_address", f"127.0.0.1:{port + 1 + pid}")
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)

from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from sharding import reallocate  # noqa: E402
from sharding.mesh import mesh_over_devices  # noqa: E402

# Meshes by position in the global jax.devices() order (device ids are 0..3 and 2048..2051 here).
DEVS = jax.devices()


def named(start, shape, *spec):
  return NamedSharding(mesh_over_devices(DEVS[start:start + math.prod(shape)], shape), P(*spec))


CASES = {
    "proc0 -> proc1": (named(0, (1, 4, 1), "fsdp"), named(4, (1, 1, 4), None, "tensor")),
    "8 fsdp -> 4 on proc1": (named(0, (1, 8, 1), "fsdp"), named(4, (1, 2, 2), "tensor", "fsdp")),
    "proc1 -> 8 mixed": (named(4, (1, 1, 4), None, "tensor"), named(0, (2, 2, 2), "fsdp", "tensor")),
    "straddling 2..5 -> 0..7": (named(2, (1, 2, 2), "fsdp", "tensor"), named(0, (1, 8, 1), None, "fsdp")),
    "proc1 -> replicated proc0": (named(4, (1, 4, 1), "fsdp"), named(0, (4, 1, 1))),
    # Gather into one device of the source mesh: whole shards of both processes move as they are.
    "8 minor -> device 5": (named(0, (1, 8, 1), None, "fsdp"), named(5, (1, 1, 1))),
}

ok = 0
# Every plan mode; bucket_bytes=600 puts each (16, 8) float32 leaf in its own bucket (two buckets
# in flight, then a wait), and the second round reuses the cached programs.
for mode in ("auto", "reshard", "pieces"):
  for name, (src, dst) in CASES.items():
    for rnd in range(2 if mode == "auto" else 1):
      ref = np.arange(16 * 8, dtype=np.float32).reshape(16, 8) + ok
      x = jax.make_array_from_callback(ref.shape, src, lambda i: ref[i], dtype=ref.dtype)
      with jax.transfer_guard("disallow"):
        y = reallocate({"w": x, "s": x, "t": x}, {"w": dst, "s": dst, "t": dst}, mode=mode, bucket_bytes=600)
        jax.block_until_ready(y)
      for leaf in y.values():
        assert leaf.sharding == dst, (name, leaf.sharding)
        for sh in leaf.addressable_shards:
          np.testing.assert_array_equal(np.asarray(sh.data), ref[sh.index], err_msg=f"{name} {mode}")
    ok += 1
    print(f"done {mode} {name}", flush=True)
print(f"RESULT process={pid} ok={ok}", flush=True)
jax.distributed.shutdown()

"""search: the per-collective latency term (Profile.collective_latency_s) of the estimator."""

import json

import pytest

from search import CallSpec, Estimator, ModelShape, Profile, layout_from_text
from search.hlo import Collective, comm_counts
from search.profile import COLLECTIVE_LATENCY_S, PROFILE_DIR

SHAPE = ModelShape(d_model=256, n_layers=6, n_heads=4, n_kv_heads=4, head_dim=64, d_ff=1024, vocab_size=1000,
                   params=6_000_000)
PROFILE = Profile("test", 8, matmul_flops=1e12, hbm_bandwidth=1e11, d2d_bandwidth=1e10, inter_host_bandwidth=1e9,
                  intra_mesh_collective_bandwidth=1e10, memory_bytes=1e9,
                  calibration={"generate": {"time": 3.0}})


def _gen(new_tokens, layers=SHAPE.n_layers):
  shape = ModelShape(**{**SHAPE.__dict__, "n_layers": layers})
  return CallSpec("g", "m", "generate", 16, shape, prompt_len=32, new_tokens=new_tokens)


def _latency(spec, layout, profile=PROFILE):
  """Seconds the latency term adds: the estimate minus the same one with zero latency."""
  zero = profile.replace(collective_latency_s=0.0, inter_host_collective_latency_s=0.0)
  return (Estimator(profile, mode="analytic", cache_dir="").seconds(spec, layout)
          - Estimator(zero, mode="analytic", cache_dir="").seconds(spec, layout))


def test_latency_scales_with_decode_steps_times_layers_for_tensor_parallel_generation():
  t2 = layout_from_text("0:4/d2f1t2")
  for steps, layers in [(8, 6), (64, 6), (64, 12), (512, 24)]:
    spec = _gen(steps, layers)
    # 2 all-reduces per layer and one for the embedding lookup, for the prefill and every decode step; each
    # step's draw over vocab-split logits (4) and the loop's stop test over split rows (1); each 10 us wall
    # clock (the kind's fitted `time` factor 3.0 does not scale it).
    want = ((1 + steps) * (2 * layers + 1) + steps * 5) * COLLECTIVE_LATENCY_S
    assert _latency(spec, t2) == pytest.approx(want, rel=1e-9)
  cost = Estimator(PROFILE, mode="analytic", cache_dir="").cost(_gen(1024, 24), t2)
  assert cost.colls_intra == 1025 * 49 + 1024 * 5 and cost.colls_inter == 0


def test_data_parallel_generation_pays_only_the_stop_test():
  assert _latency(_gen(256), layout_from_text("0:1/d1f1t1")) == 0.0
  for text in ("0:4/d4f1t1", "0:8/d8f1t1"):  # One all-reduce per decode step: whether every row is done.
    assert _latency(_gen(256), layout_from_text(text)) == pytest.approx(256 * COLLECTIVE_LATENCY_S)


def test_latency_counts_fsdp_and_data_parallel_collectives_of_a_train_step():
  spec = CallSpec("t", "m", "train_step", 16, SHAPE, seq_len=64, trained=True)
  lat = {text: _latency(spec, layout_from_text(text)) for text in ("0:1/d1f1t1", "0:4/d4f1t1", "0:4/d1f4t1m2")}
  L = SHAPE.n_layers
  assert lat["0:1/d1f1t1"] == 0.0
  assert lat["0:4/d4f1t1"] == pytest.approx((L + 1) * COLLECTIVE_LATENCY_S)   # Gradient all-reduce.
  assert lat["0:4/d1f4t1m2"] == pytest.approx(2 * 3 * (L + 1) * COLLECTIVE_LATENCY_S)  # Gather x2 + RS, x2 mbs.


def test_inter_host_latency():
  spec = _gen(512, 24)
  prof = PROFILE.replace(inter_host_collective_latency_s=50e-6)
  assert prof.inter_latency_s == 50e-6 and PROFILE.inter_latency_s == PROFILE.collective_latency_s
  # Two hosts of 8: the tensor=2 all-reduces (49 a pass over the 24 layers, 4 a token draw) stay inside a
  # host; the stop test's all-reduce over the 8 data groups crosses hosts.
  want = (513 * 49 + 512 * 4) * PROFILE.collective_latency_s + 512 * 50e-6
  assert _latency(spec, layout_from_text("0:16/d8f1t2"), prof) == pytest.approx(want)
  same = (513 * 49 + 512 * 5) * PROFILE.collective_latency_s  # One latency for both links.
  assert _latency(spec, layout_from_text("0:16/d8f1t2"), PROFILE) == pytest.approx(same)


def test_hlo_comm_counts():
  colls = [Collective("all-reduce", 1024, 2, 96, ((0, 1),)), Collective("all-gather", 64, 1, 5),
           Collective("all-reduce", 1024, 16, 3), Collective("collective-permute", 8, 2, 2, ((0, 1),))]
  assert comm_counts(colls, 8) == (98.0, 3.0)


def test_old_profiles_load_with_the_default(tmp_path):
  for name in ("h100_sxm", "h100_sxm_1gpu", "h100_cluster"):
    prof = Profile.load(name)
    assert prof.collective_latency_s == COLLECTIVE_LATENCY_S and prof.inter_host_collective_latency_s is None
  with open(f"{PROFILE_DIR}/h100_sxm.json") as f:
    d = json.load(f)
  assert "collective_latency_s" not in d  # An old file, without the field.
  d["collective_latency_s"] = 4e-6
  p = tmp_path / "p.json"
  p.write_text(json.dumps(d))
  assert Profile.load(str(p)).collective_latency_s == 4e-6
  round_trip = Profile.from_dict(json.loads(json.dumps(Profile.load(str(p)).to_dict())))
  assert round_trip == Profile.load(str(p))


class _Dev:
  def __init__(self, platform, limit=None):
    self.platform, self._limit = platform, limit

  def memory_stats(self):
    if self._limit is None:
      raise RuntimeError("memory_stats is not supported")
    return {"bytes_limit": self._limit, "bytes_in_use": 0}


def test_on_local_devices_takes_the_smallest_accelerator_limit_and_leaves_cpu_planning_alone():
  from search.profile import local_memory_bytes
  gpus = [_Dev("gpu", 105e9), _Dev("gpu", 104e9)]
  logged = []
  p = PROFILE.on_local_devices(gpus, log=logged.append)
  assert p.memory_bytes == 104e9 and p.matmul_flops == PROFILE.matmul_flops
  assert logged == ["profile test: memory_bytes 0.9 GiB -> 96.9 GiB (this machine's allocator limit)"]
  # CPU (planning for a cluster from this machine), or a runtime without memory_stats: the profile's own.
  assert PROFILE.on_local_devices([_Dev("cpu", 5e9)]) is PROFILE
  assert PROFILE.on_local_devices([_Dev("gpu")]) is PROFILE
  assert local_memory_bytes([]) is None
  # This process's (fake CPU) devices.
  assert PROFILE.on_local_devices() is PROFILE

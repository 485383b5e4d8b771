"""Meshes, strategies and logical-axis rules."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from sharding import DeviceMesh, Layout, Strategy, activation_sharding, spec_for, strategies, submeshes
from sharding.rules import PARAM_RULES


def test_layout_builds_mesh_on_the_right_devices():
  lay = Layout.on(4, fsdp=2, tensor=2)
  mesh = lay.mesh
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert mesh.devices.shape == (1, 2, 2)
  assert sorted(d.id for d in mesh.devices.flat) == [4, 5, 6, 7]
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3
  assert lay.mesh is mesh  # Cached.


def test_layout_size_mismatch():
  with pytest.raises(ValueError, match="uses 4 devices but DeviceMesh\\[0:2\\] has 2"):
    Layout(DeviceMesh(0, 2), Strategy(fsdp=4))


def test_missing_devices_named():
  with pytest.raises(ValueError, match="only 8 devices exist"):
    Layout.on(8, fsdp=2).mesh


@pytest.mark.parametrize("mesh, ok", [
    (DeviceMesh(0, 8), True), (DeviceMesh(4, 4), True), (DeviceMesh(2, 4), False), (DeviceMesh(0, 3), False),
    (DeviceMesh(6, 4), False),
])
def test_device_mesh_validation(mesh, ok):
  if ok:
    mesh.validate(devices_per_host=8, num_devices=8)
  else:
    with pytest.raises(ValueError):
      mesh.validate(devices_per_host=8, num_devices=8)


def test_multi_host_meshes_span_whole_hosts():
  DeviceMesh(8, 16).validate(devices_per_host=8, num_devices=32)
  with pytest.raises(ValueError, match="whole hosts"):
    DeviceMesh(4, 16).validate(devices_per_host=8, num_devices=32)


def test_submeshes_and_strategies():
  meshes = submeshes(8, 8)
  assert len(meshes) == 8 + 4 + 2 + 1
  assert all(m.size & (m.size - 1) == 0 and m.start % m.size == 0 for m in meshes)
  assert len(submeshes(32, 8)) == 15 * 4 + 3 + 2 + 1
  strats = strategies(8)
  assert len(strats) == 10 and len(set(strats)) == 10
  assert all(s.size == 8 for s in strats)


def test_strategy_parse_roundtrip():
  for s in strategies(16, micro_batches=(1, 4)):
    assert Strategy.parse(str(s)) == s
  with pytest.raises(ValueError, match="cannot parse strategy"):
    Strategy.parse("fsdp4")


def test_rules_shard_the_named_axes():
  lay = Layout.on(0, data=2, fsdp=2, tensor=2)
  rules = PARAM_RULES["auto"]
  assert spec_for(("layers", "embed", "heads", "head_dim"), (2, 64, 4, 16), lay, rules) == P(None, "fsdp", "tensor")
  assert spec_for(("vocab", "embed"), (256, 64), lay, rules) == P("tensor", "fsdp")
  lay_dp = Layout.on(0, data=8, rules="replicated")
  assert spec_for(("vocab", "embed"), (256, 64), lay_dp, PARAM_RULES["replicated"]) == P()


def test_rule_set_rejects_axes_it_ignores():
  with pytest.raises(ValueError, match="rule set 'fsdp' does not shard parameters over \\['tensor'\\]"):
    activation_sharding(Layout.on(0, fsdp=4, tensor=2, rules="fsdp"), ("batch",))
  with pytest.raises(ValueError, match="unknown rule set 'zero3'"):
    activation_sharding(Layout.on(0, fsdp=8, rules="zero3"), ("batch",))


def test_activation_batch_divisibility():
  lay = Layout.on(0, data=2, fsdp=2, tensor=2)
  assert activation_sharding(lay, ("batch", "seq"), (8, 5)).spec == P(("data", "fsdp"))
  with pytest.raises(ValueError, match="'batch' of size 6 does not divide"):
    activation_sharding(lay, ("batch", "seq"), (6, 5))

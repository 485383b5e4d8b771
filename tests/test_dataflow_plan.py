"""Dataflow graphs and execution plans."""

import pytest

from real_jax.dataflow import Call, CallKind, Graph, GraphError
from search import ExecutionPlan
from sharding import Layout

G, I, T = CallKind.GENERATE, CallKind.INFERENCE, CallKind.TRAIN_STEP


def ppo_like():
  return Graph([
      Call("actor_gen", "actor", G, ("prompts",), ("seqs", "logp"), 8),
      Call("reward_inf", "reward", I, ("seqs",), ("scores",), 8),
      Call("ref_inf", "ref", I, ("seqs",), ("ref_logp",), 8),
      Call("critic_inf", "critic", I, ("seqs",), ("values",), 8),
      Call("actor_train", "actor", T, ("seqs", "logp", "ref_logp", "scores", "values"), (), 8),
      Call("critic_train", "critic", T, ("seqs", "scores", "values", "ref_logp", "logp"), (), 8),
  ], models=["actor", "critic", "ref", "reward"])


def test_edges_and_order():
  g = ppo_like()
  assert g.order[0] == "actor_gen"
  assert set(g.order[1:4]) == {"reward_inf", "ref_inf", "critic_inf"}
  assert g.parents("actor_train") == ["actor_gen", "critic_inf", "ref_inf", "reward_inf"]
  assert {(e.src, e.key) for e in g.edges if e.dst == "reward_inf"} == {("actor_gen", "seqs")}
  assert g.trained_models() == {"actor", "critic"}


def test_unroll_adds_parameter_version_edges():
  tasks = dict(ppo_like().unroll(3))
  assert (1, "actor_train") not in tasks[(1, "actor_gen")]
  assert (0, "actor_train") in tasks[(1, "actor_gen")]
  assert (0, "critic_train") in tasks[(1, "critic_inf")]
  assert not any(d[0] == 0 for d in tasks[(1, "ref_inf")] if d[1] != "actor_gen")  # Frozen: no version edge.
  assert len(tasks) == 18


@pytest.mark.parametrize("calls, match", [
    ([Call("a", "actor", G, ("prompts",), ("x",)), Call("b", "actor", I, ("y",), ())], r"call 'b' reads 'y'"),
    ([Call("a", "nobody", G, ("prompts",), ("x",))], r"call 'a' uses unknown model 'nobody'"),
    ([Call("a", "actor", I, ("y",), ("x",)), Call("b", "actor", I, ("x",), ("y",))], r"cycle through calls \['a', 'b'\]"),
    ([Call("a", "actor", G, (), ("x",)), Call("b", "actor", G, (), ("x",))], r"'x' is produced by both 'a' and 'b'"),
    ([Call("a", "actor", G, (), ("x",)), Call("a", "actor", G, (), ("y",))], r"two calls are named 'a'"),
])
def test_graph_errors_name_call_and_key(calls, match):
  with pytest.raises(GraphError, match=match):
    Graph(calls, models=["actor"])


def test_plan_json_and_inline_roundtrip():
  plan = ExecutionPlan.parse("actor_gen=0:4/d1f1t4, reward_inf=4:2/d2f1t1, ref_inf=6:2/d1f2t1m2/fsdp, "
                             "offload=ref+reward", name="manual")
  assert plan["ref_inf"] == Layout.on(6, fsdp=2, micro_batches=2, rules="fsdp")
  assert plan.offload == {"ref", "reward"}
  assert ExecutionPlan.from_json(plan.to_json()) == plan
  assert ExecutionPlan.parse(plan.to_text(), name="manual") == plan
  table = plan.table(models={"actor_gen": "actor"})
  assert "actor_gen   actor  0-3" in table and "host memory" in table


@pytest.mark.parametrize("text, match", [
    ("actor_gen=0-4/d1f1t4", "START:SIZE"),
    ("actor_gen=0:4/d1f1t2", "uses 2 devices but DeviceMesh\\[0:4\\] has 4"),
    ("actor_gen=0:4/tp4", "cannot parse strategy"),
    ("actor_gen", "expected call="),
])
def test_plan_parse_errors(text, match):
  with pytest.raises(ValueError, match=match):
    ExecutionPlan.parse(text)


def test_plan_coverage_and_file_errors(tmp_path):
  plan = ExecutionPlan.colocated(["a", "b"], Layout.on(0, fsdp=8))
  plan.check_covers(["a", "b"])
  with pytest.raises(ValueError, match=r"no layout for calls \['c'\]"):
    plan.check_covers(["a", "b", "c"])
  bad = tmp_path / "plan.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="plan.json: not valid JSON"):
    ExecutionPlan.load(str(bad))
  bad.write_text('{"calls": {"a": {"devices": [0], "strategy": "d1f1t1"}}}')
  with pytest.raises(ValueError, match="plan entry for call 'a' is invalid"):
    ExecutionPlan.load(str(bad))

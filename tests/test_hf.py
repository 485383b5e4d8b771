"""HF interop: logit parity against goldens made by transformers, export round trips, loud errors.

The goldens in tests/fixtures/hf were made by scripts/make_hf_fixtures.py (see its README); this
file needs no torch.
"""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from real_jax.models import hf
from sharding import Layout

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
CASES = ["llama2", "llama3", "qwen2", "mistral", "llama_tied", "llama_seqcls"]
LAYOUTS = {"single": None, "fsdp2_tensor2": Layout.on(0, fsdp=2, tensor=2), "tensor2_at4": Layout.on(4, tensor=2)}


def _golden(case):
  return dict(np.load(FIXTURES / case / "golden.npz"))


def _run(model, g):
  return np.asarray(model(g["input_ids"], g["position_ids"], g["attention_mask"]))


def _rel_err(model, g) -> float:
  """||ours - ref|| / ||ref|| on real tokens (logits) or on HF's pooled scores (scalar head)."""
  out = _run(model, g)
  if "scores" in g:
    last_real = g["attention_mask"].shape[1] - 1 - np.argmax(g["attention_mask"][:, ::-1], axis=1)
    np.testing.assert_array_equal(last_real, g["score_index"])
    ours, ref = out[np.arange(len(last_real)), last_real], g["scores"]
  else:
    mask = g["attention_mask"].astype(bool)
    ours, ref = out[mask], g["logits"][mask]
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def _params(model) -> dict[str, np.ndarray]:
  flat = {}
  jax.tree_util.tree_map_with_path(lambda p, v: flat.__setitem__(jax.tree_util.keystr(p), np.asarray(v.get_value())),
                                   nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable))
  return flat


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, layout):
  model = hf.load_pretrained(FIXTURES / case, layout=LAYOUTS[layout])
  err = _rel_err(model, _golden(case))
  print(f"{case} {layout}: relative error {err:.3g}")
  assert err < 1e-4


def test_sharded_load_is_really_sharded():
  layout = LAYOUTS["fsdp2_tensor2"]
  model = hf.load_pretrained(FIXTURES / "llama3", layout=layout)
  wq = model.layers.wq.get_value()
  assert wq.sharding.mesh.devices.size == 4
  assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert wq.addressable_shards[0].data.shape == (2, 32, 4, 16)
  assert {d.id for d in wq.devices()} == {0, 1, 2, 3}


def test_config_round_trip():
  for case in CASES:
    hf_cfg = json.loads((FIXTURES / case / "config.json").read_text())
    cfg, head = hf.config_from_hf(hf_cfg), hf.head_from_hf(hf_cfg)
    assert hf.config_from_hf(hf.config_to_hf(cfg, head=head)) == cfg
  llama3 = hf.config_from_hf(json.loads((FIXTURES / "llama3" / "config.json").read_text()))
  assert (llama3.head_dim, llama3.n_heads, llama3.n_kv_heads, llama3.rope_theta) == (16, 8, 2, 500000.0)
  assert llama3.rope_scaling.original_max_position_embeddings == 8
  legacy = hf.config_to_hf(llama3)  # transformers 4.x keys: rope_theta + rope_scaling.
  assert legacy["rope_scaling"]["rope_type"] == "llama3" and legacy["rope_theta"] == 500000.0


@pytest.mark.parametrize("case", CASES)
def test_export_round_trip(case, tmp_path):
  model = hf.load_pretrained(FIXTURES / case)
  hf.save_pretrained(model, tmp_path)
  again = hf.load_pretrained(tmp_path)
  a, b = _params(model), _params(again)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  np.testing.assert_array_equal(_run(model, _golden(case)), _run(again, _golden(case)))
  # Same tensor names and bytes as transformers wrote.
  with safe_open(str(FIXTURES / case / "model.safetensors"), "np") as ref, \
       safe_open(str(tmp_path / "model.safetensors"), "np") as ours:
    assert set(ref.keys()) == set(ours.keys())
    for k in ref.keys():
      np.testing.assert_array_equal(ref.get_tensor(k), ours.get_tensor(k), err_msg=k)


def test_sharded_export_with_index(tmp_path):
  model = hf.load_pretrained(FIXTURES / "qwen2", layout=LAYOUTS["fsdp2_tensor2"])
  hf.save_pretrained(model, tmp_path, max_shard_size=100_000)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) >= 3 and not (tmp_path / "model.safetensors").exists()
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in _params(model).values())
  again = hf.load_pretrained(tmp_path, layout=LAYOUTS["tensor2_at4"])
  assert _rel_err(again, _golden("qwen2")) < 1e-4
  for k, v in _params(model).items():
    np.testing.assert_array_equal(v, _params(again)[k], err_msg=k)


def test_bfloat16_export_and_load(tmp_path):
  model = hf.load_pretrained(FIXTURES / "llama2")
  hf.save_pretrained(model, tmp_path, dtype="bfloat16")
  assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
  bf = hf.load_pretrained(tmp_path)
  assert bf.cfg.param_dtype == "bfloat16" and bf.layers.wq.get_value().dtype == jax.numpy.bfloat16
  for k, v in _params(model).items():
    np.testing.assert_array_equal(v.astype(jax.numpy.bfloat16), _params(bf)[k], err_msg=k)
  f32 = hf.load_pretrained(tmp_path, dtype="float32")
  assert f32.layers.wq.get_value().dtype == np.float32
  assert _rel_err(f32, _golden("llama2")) < 2e-2  # bf16 weights.


def test_scalar_head_from_causal_lm_checkpoint():
  critic = hf.load_pretrained(FIXTURES / "llama2", head="scalar")
  assert critic.head == "scalar"
  np.testing.assert_array_equal(np.asarray(critic.score.get_value()), 0.0)
  np.testing.assert_array_equal(_run(critic, _golden("llama2")), 0.0)
  with pytest.raises(ValueError, match="without an LM head"):
    hf.load_pretrained(FIXTURES / "llama_seqcls", head="lm")


@pytest.mark.parametrize("view", [((4, 16), (64,)), ((64,), (4, 16)), ((), (64,)), ((8, 2, 3),)])
def test_map_reads_any_slice(view):
  """_Map.read of any sub-block equals slicing the fully read array (covers head_dim splits too)."""
  rng = np.random.default_rng(0)
  n_view = sum(len(g) for g in view)
  for perm in [tuple(range(n_view)), tuple(reversed(range(n_view)))]:
    mp = hf._Map("t", view, perm)
    full_hf = rng.standard_normal(mp.hf_shape).astype(np.float32)
    full = mp.read(full_hf, [(0, s) for s in mp.our_shape])
    np.testing.assert_array_equal(mp.write(full), full_hf)
    for _ in range(5):
      ranges = []
      for s in mp.our_shape:
        a = int(rng.integers(0, s))
        ranges.append((a, int(rng.integers(a + 1, s + 1))))
      np.testing.assert_array_equal(mp.read(full_hf, ranges), full[tuple(slice(*r) for r in ranges)])


def _copy_with(tmp_path, case, edit_tensors=None, edit_config=None):
  d = tmp_path / case
  shutil.copytree(FIXTURES / case, d)
  if edit_tensors:
    with safe_open(str(d / "model.safetensors"), "np") as f:
      tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit_tensors(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
  if edit_config:
    cfg = json.loads((d / "config.json").read_text())
    edit_config(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
  return d


def test_missing_tensor_raises(tmp_path):
  d = _copy_with(tmp_path, "qwen2", lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
  with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.self_attn\.k_proj\.bias"):
    hf.load_pretrained(d)


def test_wrong_shape_raises(tmp_path):
  def shrink(t):
    t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:-1]
  d = _copy_with(tmp_path, "llama2", shrink)
  with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*shape"):
    hf.load_pretrained(d, layout=LAYOUTS["fsdp2_tensor2"])


def test_unexpected_tensor_raises(tmp_path):
  d = _copy_with(tmp_path, "llama_tied", lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"]))
  with pytest.raises(ValueError, match=r"unexpected.*lm_head\.weight"):
    hf.load_pretrained(d)


@pytest.mark.parametrize("key,value,match", [
    ("architectures", ["GPT2LMHeadModel"], "architectures"),
    ("architectures", ["LlamaForTokenClassification"], "architectures"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, "rope_type"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_type"),
    ("hidden_act", "gelu", "hidden_act"),
    ("attention_bias", True, "attention_bias"),
    ("id2label", {"0": "a", "1": "b"}, "id2label"),
])
def test_unsupported_config_raises(tmp_path, key, value, match):
  case = "llama_seqcls" if key == "id2label" else "llama2"

  def edit(cfg):
    if key == "rope_scaling":
      cfg.pop("rope_parameters")
    cfg[key] = value
  d = _copy_with(tmp_path, case, edit_config=edit)
  with pytest.raises(ValueError, match=match):
    hf.load_pretrained(d)


def test_mistral_sliding_window_raises():
  cfg = json.loads((FIXTURES / "mistral" / "config.json").read_text())
  assert hf.config_from_hf(dict(cfg, sliding_window=4096)).family == "mistral"  # >= max positions (64): fine.
  with pytest.raises(ValueError, match="sliding_window"):
    hf.config_from_hf(dict(cfg, sliding_window=16))
  qwen = json.loads((FIXTURES / "qwen2" / "config.json").read_text())
  hf.config_from_hf(dict(qwen, sliding_window=16))  # Ignored while use_sliding_window is false.
  with pytest.raises(ValueError, match="sliding_window"):
    hf.config_from_hf(dict(qwen, sliding_window=16, use_sliding_window=True))


def test_extra_config_keys(tmp_path):
  model = hf.load_pretrained(FIXTURES / "llama_seqcls")
  hf.save_pretrained(model, tmp_path, extra_config={"pad_token_id": 0, "eos_token_id": 2})
  cfg = json.loads((tmp_path / "config.json").read_text())
  assert cfg["pad_token_id"] == 0 and cfg["architectures"] == ["LlamaForSequenceClassification"]
  with pytest.raises(ValueError, match="hidden_size"):
    hf.save_pretrained(model, tmp_path / "x", extra_config={"hidden_size": 8})

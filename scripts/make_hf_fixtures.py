"""Golden HF `transformers` fixtures for the Flax model's logit-parity tests (tests/test_hf.py).

Runs under the Python 3.11 venv that has torch (the test suite itself never imports torch):

  cd /work/main && .venv311/bin/python scripts/make_hf_fixtures.py            # (re)write tests/fixtures/hf/*
  .venv311/bin/python scripts/make_hf_fixtures.py --check-export DIR --case llama2

The first form builds tiny random-init models with fixed seeds and writes, per case,
`tests/fixtures/hf/<case>/{config.json, model.safetensors, golden.npz}`. golden.npz holds
  input_ids      int32 [2, 12]  row 1 LEFT-padded by 3 with pad id 0 (real tokens are never 0)
  attention_mask int32 [2, 12]
  position_ids   int32 [2, 12]  cumsum(mask) - 1 clipped at 0, passed to HF explicitly
  logits         float32 [2, 12, V]  (causal LM cases), fp32, eval mode, eager attention
  scores         float32 [2], score_index int32 [2]  (sequence classification: HF pools the
                 rightmost token that is not pad_token_id; score_index is that index)
Weights are drawn with initializer_range 0.15 (not HF's 0.02) so attention is far from uniform and
RoPE / masking errors show up in the logits; norm weights are 1 + N(0, 0.1) and q/k/v biases
N(0, 0.1) so that they are really tested (HF initialises them to 1 and 0).

The second form loads an exported directory (e.g. written by `real_jax.models.save_pretrained`)
with transformers and compares its output on the golden inputs of `--case` with the golden,
printing the relative error over non-padded positions; exit status 1 above `--tol`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np
import torch
import transformers
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM,
                          LlamaForSequenceClassification, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "hf"
B, T, PAD_LEFT = 2, 12, 3
INIT_STD = 0.15

_COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, max_position_embeddings=64, hidden_act="silu",
               initializer_range=INIT_STD, pad_token_id=0, bos_token_id=1, eos_token_id=2)

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}


def _cases():
  """case name -> (model class, config, seed)."""
  return {
      "llama2": (LlamaForCausalLM, LlamaConfig(
          **_COMMON, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-6,
          rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False), 1),
      # 8 query heads of head_dim 16 on a 64-wide residual: head_dim is NOT hidden // heads here.
      "llama3": (LlamaForCausalLM, LlamaConfig(
          **_COMMON, intermediate_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
          rms_norm_eps=1e-5, rope_parameters=dict(LLAMA3_ROPE), tie_word_embeddings=False), 2),
      "qwen2": (Qwen2ForCausalLM, Qwen2Config(
          **_COMMON, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
          rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True,
          use_sliding_window=False), 3),
      "mistral": (MistralForCausalLM, MistralConfig(
          **_COMMON, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
          rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, sliding_window=None,
          tie_word_embeddings=False), 4),
      "llama_tied": (LlamaForCausalLM, LlamaConfig(
          **_COMMON, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
          rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True), 5),
      "llama_seqcls": (LlamaForSequenceClassification, LlamaConfig(
          **_COMMON, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
          rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
          num_labels=1), 6),
  }


def golden_inputs(seed: int, vocab: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, size=(B, T)).astype(np.int32)  # Never 0 (pad), 1 (bos), 2 (eos).
  mask = np.ones((B, T), np.int32)
  ids[1, :PAD_LEFT] = 0
  mask[1, :PAD_LEFT] = 0
  pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}


def _randomise(model: torch.nn.Module, seed: int) -> None:
  """Norm weights 1 + N(0, 0.1) and biases N(0, 0.1): HF initialises them to exactly 1 and 0."""
  g = torch.Generator().manual_seed(1000 + seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
      elif name.endswith(".bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _run(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(inputs["input_ids"]).long(),
                attention_mask=torch.from_numpy(inputs["attention_mask"]).long(),
                position_ids=torch.from_numpy(inputs["position_ids"]).long())
  return out.logits.float().numpy()


def _rel(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
  if mask is not None:
    a, b = a[mask.astype(bool)], b[mask.astype(bool)]
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _score_index(input_ids: np.ndarray, pad_id: int) -> np.ndarray:
  """HF's pooling index: the rightmost token that is not pad (works for left and right padding)."""
  non_pad = (input_ids != pad_id).astype(np.int64)
  return (np.arange(input_ids.shape[1]) * non_pad).argmax(-1).astype(np.int32)


def _build(cls, config, seed: int):
  torch.manual_seed(seed)
  model = cls(config).eval()
  model.set_attn_implementation("eager")
  _randomise(model, seed)
  return model


def make_case(name: str, cls, config, seed: int) -> dict[str, float]:
  model = _build(cls, config, seed)
  inputs = golden_inputs(seed, config.vocab_size)
  out = _run(model, inputs)
  golden = dict(inputs)
  checks = {}
  if cls is LlamaForSequenceClassification:
    idx = _score_index(inputs["input_ids"], config.pad_token_id)
    golden["scores"] = out.reshape(B).astype(np.float32)  # HF has pooled already: logits are [B, 1].
    golden["score_index"] = idx
    assert idx.tolist() == [T - 1, T - 1], idx  # Left padding: the last token of every row.
  else:
    golden["logits"] = out.astype(np.float32)
  mask = inputs["attention_mask"]

  # The features under test must matter for the output: otherwise parity would not test them.
  if name == "llama3":
    plain = config.to_dict()
    plain["rope_parameters"] = {"rope_type": "default", "rope_theta": LLAMA3_ROPE["rope_theta"]}
    unscaled = cls(type(config).from_dict(plain)).eval()
    unscaled.set_attn_implementation("eager")
    unscaled.load_state_dict(model.state_dict())
    checks["rel_change_without_rope_scaling"] = _rel(_run(unscaled, inputs), out, mask)
    assert checks["rel_change_without_rope_scaling"] > 1e-2, checks
  if name == "qwen2":
    nobias = _build(cls, config, seed)
    nobias.load_state_dict(model.state_dict())
    with torch.no_grad():
      for n, p in nobias.named_parameters():
        if n.endswith(".bias"):
          p.zero_()
    checks["rel_change_without_bias"] = _rel(_run(nobias, inputs), out, mask)
    assert checks["rel_change_without_bias"] > 1e-2, checks
  # The padded row depends on its mask (RoPE is relative, so shifted positions alone would not matter).
  unmasked = dict(inputs, attention_mask=np.ones_like(mask))
  row_mask = None if cls is LlamaForSequenceClassification else mask[1:]  # Pooled scores: no token axis.
  checks["rel_change_without_mask"] = _rel(_run(model, unmasked)[1:], out[1:], row_mask)
  assert checks["rel_change_without_mask"] > 1e-2, checks

  d = OUT / name
  d.mkdir(parents=True, exist_ok=True)
  for f in d.iterdir():
    f.unlink()
  model.save_pretrained(d, safe_serialization=True)
  np.savez(d / "golden.npz", **golden)
  # The saved checkpoint reproduces the golden when transformers loads it back.
  checks["reload_rel_err"] = check_export(d, name, quiet=True)
  assert checks["reload_rel_err"] < 1e-6, checks
  size = sum(f.stat().st_size for f in d.iterdir())
  print(f"{name:13s} {size / 1024:6.0f} KB  " + "  ".join(f"{k}={v:.3g}" for k, v in checks.items()))
  return checks


def check_export(export_dir: pathlib.Path, case: str, *, quiet: bool = False) -> float:
  """Relative error of transformers' output for `export_dir` against the golden of `case`."""
  golden = dict(np.load(OUT / case / "golden.npz"))
  cfg = json.loads((pathlib.Path(export_dir) / "config.json").read_text())
  seqcls = any(a.endswith("ForSequenceClassification") for a in cfg.get("architectures", []))
  auto = AutoModelForSequenceClassification if seqcls else AutoModelForCausalLM
  model = auto.from_pretrained(export_dir, dtype=torch.float32, attn_implementation="eager").eval()
  out = _run(model, golden)
  if seqcls:
    err = _rel(out.reshape(B), golden["scores"])
  else:
    err = _rel(out, golden["logits"], golden["attention_mask"])
  if not quiet:
    print(f"{case}: transformers {transformers.__version__} loaded {export_dir} as {type(model).__name__}; "
          f"relative error vs golden = {err:.3g}")
  return err


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--check-export", metavar="DIR", help="compare an exported checkpoint with a golden")
  p.add_argument("--case", help="golden case for --check-export (a directory name under tests/fixtures/hf)")
  p.add_argument("--tol", type=float, default=1e-4)
  p.add_argument("--only", nargs="*", help="make only these cases")
  args = p.parse_args(argv)
  torch.set_grad_enabled(False)
  transformers.utils.logging.disable_progress_bar()
  if args.check_export:
    if not args.case:
      p.error("--check-export needs --case")
    return 0 if check_export(pathlib.Path(args.check_export), args.case) < args.tol else 1
  print(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}")
  for name, (cls, config, seed) in _cases().items():
    if not args.only or name in args.only:
      make_case(name, cls, config, seed)
  return 0


if __name__ == "__main__":
  sys.exit(main())

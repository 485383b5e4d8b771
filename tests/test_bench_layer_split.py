"""bench/layer_split.py: the pad-chain count on HLO text, and a CPU smoke run of both variants."""

import pytest

import real_jax.models.transformer as transformer
from bench import layer_split

_HLO = """%fused_reduce.5 (param_0: bf16[4,8], param_1: bf16[4,8]) -> f32[4] {
  %pad.1 = bf16[2,4,8]{2,1,0} pad(%b1, %c), padding=1_0x0_0x0_0
  %pad.2 = bf16[2,4,8]{2,1,0} pad(%b2, %c), padding=0_1x0_0x0_0
  %pad.3 = bf16[2,4,8]{2,1,0} pad(%b3, %c), padding=0_1x0_0x0_0
  ROOT %reduce = f32[4]{0} reduce(%x, %c), dimensions={1}
}

%fused_other (param_0: bf16[4,8]) -> bf16[2,4,8] {
  %pad.4 = bf16[2,4,8]{2,1,0} pad(%b4, %c), padding=1_0x0_0x0_0
  ROOT %concatenate = bf16[2,4,8]{2,1,0} concatenate(%a, %b), dimensions={0}
}
"""


def test_pad_chains_counts_computations_over_the_threshold():
  assert layer_split.pad_chains(_HLO, min_pads=2) == 1
  assert layer_split.pad_chains(_HLO, min_pads=0) == 2
  assert layer_split.pad_chains(_HLO, min_pads=3) == 0


@pytest.mark.slow
def test_smoke_run_records_both_variants():
  original = transformer.layer_arrays
  out = layer_split.main(["--small", "--layouts", "fsdp=4"])
  assert transformer.layer_arrays is original  # The swapped-in variant does not outlive the run.
  cases = out["cases"]
  assert [(c["layers"], c["barrier"]) for c in cases] == [("split", False), ("slices", False)], cases
  for c in cases:
    assert "error" not in c, c
    assert c["step_s"] > 0 and c["roofline_s"] > 0 and c["loss_finite"], c
    assert c["roofline_fraction"] == c["roofline_s"] / c["step_s"]
  for k in ("card", "jax", "date", "matmul_bf16_flops_per_s"):
    assert k in out

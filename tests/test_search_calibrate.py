"""search.calibrate: the time-term fit on known numbers, and `python -m search.profile --calibrate` end to end."""

import dataclasses
import json
import math

import pytest

from search import ModelShape, Profile
from search.calibrate import Case, default_cases, fit, predict, report

PROFILE = Profile("test", 8, matmul_flops=1e12, hbm_bandwidth=1e11, d2d_bandwidth=1e10, inter_host_bandwidth=1e9,
                  intra_mesh_collective_bandwidth=1e10, memory_bytes=1e9, call_overhead_s=1e-4)
SMALL = ModelShape(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=64, d_ff=1024, vocab_size=1000,
                   params=4_000_000)
LARGE = dataclasses.replace(SMALL, d_model=512, n_layers=8, head_dim=128, d_ff=2048, params=30_000_000)
# The "machine": 2 ms per call; matmul and memory time add up (bytes_time), generation 1.8x slower than
# counted plus 40 us per decode step and layer, train steps 1.3x with half their FSDP communication
# hidden and their all-reduces 1.5x slower than the link (latency, no overlap).
TRUE = PROFILE.replace(step_overhead_s=4e-5, call_overhead_s=2e-3, calibration={
    "generate": {"time": 1.8, "bytes_time": 0.6}, "inference": {"bytes_time": 1.0},
    "train_step": {"time": 1.3, "bytes_time": 2.0, "comm_time": 0.5, "reduce_time": 1.5}})


def _records(shapes):
  recs = []
  for name, shape in shapes.items():
    cases = [Case(name, "generate", "lm", "0:1/d1f1t1", 8, prompt_len=16, new_tokens=32),
             Case(name, "generate", "lm", "0:1/d1f1t1", 64, prompt_len=128, new_tokens=8),
             Case(name, "generate", "lm", "0:4/d1f1t4", 16, prompt_len=32, new_tokens=16),
             Case(name, "inference", "lm", "0:1/d1f1t1", 8, seq_len=64),
             Case(name, "inference", "lm", "0:1/d1f1t1", 64, seq_len=512),
             Case(name, "inference", "scalar", "0:4/d1f4t1", 16, seq_len=128),
             Case(name, "train_step", "lm", "0:1/d1f1t1", 8, seq_len=64),
             Case(name, "train_step", "lm", "0:1/d1f1t1", 64, seq_len=512),
             Case(name, "train_step", "lm", "0:4/d1f4t1", 16, seq_len=64),
             Case(name, "train_step", "lm", "0:4/d1f1t4", 16, seq_len=64)]
    for c in cases:
      rec = {"name": c.name, **dataclasses.asdict(c), "shape": dataclasses.asdict(shape)}
      rec["measured_s"] = predict(TRUE, rec)
      recs.append(rec)
  return recs


def test_fit_recovers_known_time_terms():
  recs = _records({"small": SMALL, "large": LARGE})
  fitted, info = fit(PROFILE, recs)
  assert info["log_sq_err_after"] < 1e-4 * info["log_sq_err_before"]
  for r in recs:
    assert predict(fitted, r) == pytest.approx(r["measured_s"], rel=0.01)
  assert fitted.step_overhead_s == pytest.approx(4e-5, rel=0.1)
  assert fitted.calibration["train_step"]["comm_time"] == pytest.approx(0.5, rel=0.1)
  assert fitted.calibration["train_step"]["reduce_time"] == pytest.approx(1.5, rel=0.1)
  # Inference was timed at fsdp=4 only (gathers): nothing says how its all-reduces run, so no factor.
  assert "comm_time" in fitted.calibration["inference"] and "reduce_time" not in fitted.calibration["inference"]
  round_trip = Profile.from_dict(json.loads(json.dumps(fitted.to_dict())))
  assert round_trip.calibration == fitted.calibration and round_trip == fitted


def test_fit_keeps_rates_physical():
  """Timings that a matmul rate above the measured one, or decode reads above the measured HBM bandwidth,
  would explain best: the fit stays at the measured rates (`calibrate._floors`)."""
  fast = TRUE.replace(calibration={"generate": {"time": 3.0, "bytes_time": 0.15}, "inference": {"time": 0.5},
                                   "train_step": {"time": 1.3, "bytes_time": 2.0, "comm_time": 0.5}})
  recs = _records({"small": SMALL, "large": LARGE})
  for r in recs:
    r["measured_s"] = predict(fast, r)
  fitted, info = fit(PROFILE, recs)
  assert info["log_sq_err_after"] < info["log_sq_err_before"]
  cal = fitted.calibration
  for kind in ("generate", "inference", "train_step"):
    assert cal[kind]["time"] >= 0.98, (kind, cal[kind])
  assert cal["generate"]["time"] * cal["generate"]["bytes_time"] >= 0.98, cal["generate"]


def test_floors_follow_the_measured_rates_of_a_faster_card():
  """Calibrating against a base profile of a slower card: with the machine's measured rates given
  (HBM and matmul 2x the profile's), the floors sit at half the profile's times, so a card that reads
  and multiplies twice as fast is fitted as such; without them the fit is held at the profile's rates."""
  fast = TRUE.replace(calibration={"generate": {"time": 0.5, "bytes_time": 1.0}, "inference": {"time": 0.5},
                                   "train_step": {"time": 0.5}})
  recs = _records({"small": SMALL, "large": LARGE})
  for r in recs:
    r["measured_s"] = predict(fast, r)
  rates = {"matmul_flops": 2 * PROFILE.matmul_flops, "hbm_bandwidth": 2 * PROFILE.hbm_bandwidth}
  held, _ = fit(PROFILE, recs)
  freed, info = fit(PROFILE, recs, rates)
  g = freed.calibration["generate"]
  assert g["time"] * g["bytes_time"] == pytest.approx(0.5, rel=0.05), g
  assert freed.calibration["train_step"]["time"] == pytest.approx(0.5, rel=0.05)
  assert info["log_sq_err_after"] < 1e-3
  assert held.calibration["generate"]["time"] * held.calibration["generate"]["bytes_time"] >= 0.98


def test_report_holds_out_the_largest_model():
  recs = _records({"small": SMALL, "large": LARGE})
  _, rep = report(PROFILE, recs)
  assert rep["holdout"]["fit_on"] == ["small"] and rep["holdout"]["held_out"] == "large"
  roles = {r["model"]: r["role"] for r in rep["records"]}
  assert roles == {"small": "fit", "large": "held_out"}
  held = rep["summary"]["held_out_calls_of_holdout_fit"]
  assert held["before"]["calls"] == 10 and held["after"]["max_abs_rel_err"] < held["before"]["max_abs_rel_err"]
  assert rep["summary"]["all_calls"]["after"]["max_abs_rel_err"] < 0.01


def test_fit_keeps_the_base_when_nothing_improves():
  recs = _records({"small": SMALL})
  for r in recs:
    r["measured_s"] = predict(PROFILE, r)  # Already exact.
  fitted, info = fit(PROFILE, recs)
  assert fitted is PROFILE and "kept_base" in info


def test_default_cases_fit_the_machine():
  for n in (1, 4, 8):
    for c in default_cases("gpu", n):
      dm, st = c.layout.split("/")
      start, size = map(int, dm.split(":"))
      assert start + size <= n and c.batch % (int(st[1]) * int(st[st.index("f") + 1])) == 0
  assert {c.model for c in default_cases("gpu", 4)} == {"350m", "1.3b"}
  assert len(default_cases("cpu", 8, kinds=("generate",))) == 4
  with pytest.raises(ValueError, match="calibration kinds"):
    default_cases("cpu", 8, kinds=("decode",))


@pytest.mark.parametrize("text", ["1.3b generate 0:2/d2f1t1 b128p128n512", "350m values 0:2/d1f2t1 b128s640",
                                  "1.3b logprobs 0:1/d1f1t1 b32s256", "1.3b train 0:2/d1f2t1 b32s640 remat=full"])
def test_case_names_parse(text):
  assert Case.parse(text).name == text


@pytest.mark.parametrize("text, match", [("1.3b generate 0:2/d2f1t1 b128s640", "generation takes bBpPnN"),
                                         ("1.3b decode 0:2/d2f1t1 b8s8", "expected 'MODEL generate"),
                                         ("1.3b values 0:2/d2f1t1 b8s8 remat=full", "remat applies to train"),
                                         ("1.3b values 0:2/d2f1t2 b8s8", "uses 4 devices")])
def test_case_parse_errors(text, match):
  with pytest.raises(ValueError, match=match):
    Case.parse(text)


def test_calibrate_cli_on_cpu(tmp_path, capsys):
  from search import calibrate
  from search.profile import main
  out = tmp_path / "cpu_calibrated.json"
  # Two named cases (every case compiles; this CPU is shared and slow), the budget a backstop.
  main(["--calibrate", "--cases", "tiny generate 0:1/d1f1t1 b8p16n8; tiny logprobs 0:2/d1f1t2 b8s32", "--budget", "50",
        "--reps", "2", "--out", str(out)])
  assert "all_calls:" in capsys.readouterr().out
  prof = Profile.load(str(out))
  assert Profile.from_dict(json.loads(json.dumps(prof.to_dict()))) == prof  # round trip
  rep = prof.calibration_report
  assert rep["status"] == "fitted" and rep["machine"]["devices"] == 8 and rep["micro"]["matmul_flops"] > 0
  # Timed (pinned_host exists on CPU too), not the 20 GB/s default passed off as measured.
  assert rep["micro"]["host_bandwidth"] not in (None, 20e9) and prof.host_bandwidth == rep["micro"]["host_bandwidth"]
  timed = [r for r in rep["records"] if r.get("measured_s")]
  assert timed and timed[0]["name"] == "tiny generate 0:1/d1f1t1 b8p16n8"
  # Each record says what ran (fp32 on CPU: the segments' cache prefixes, unfused attention).
  assert timed[0]["decode_kv_slots"] == pytest.approx((2 * 17 + 2 * 19 + 2 * 21 + 22) / 7)
  assert timed[0]["fused_attention"] is False
  # The fitted calls' error, as the fit measures it (sum of squared log(predicted / measured)), went down.
  fit_info = rep["fit"]
  assert "kept_base" not in fit_info and fit_info["log_sq_err_after"] < 0.5 * fit_info["log_sq_err_before"]
  log_sq = lambda key: sum(math.log1p(r[key]) ** 2 for r in timed)  # noqa: E731
  assert log_sq("rel_err_after") == pytest.approx(fit_info["log_sq_err_after"], rel=1e-6)
  assert set(prof.calibration) >= {r["kind"] for r in timed}
  # A refit from the written records (no timing) reproduces the fit.
  again = calibrate.refit(str(out))
  for kind, factors in prof.calibration.items():
    assert again.calibration[kind] == pytest.approx(factors, rel=1e-6)
  assert again.step_overhead_s == pytest.approx(prof.step_overhead_s, rel=1e-6)


def test_from_bench_reproduces_the_committed_h100_profile(tmp_path, capsys):
  import os

  from search.profile import PROFILE_DIR, main
  root = os.path.dirname(os.path.dirname(__file__))
  committed = Profile.load(os.path.join(PROFILE_DIR, "h100_sxm_bench.json"))
  base = tmp_path / "base.json"  # The base it was fitted from (h100_sxm then; that file may be recalibrated since).
  Profile.from_dict(committed.calibration_report["base_profile"]).save(str(base))
  out = tmp_path / "h100_sxm_bench.json"
  main(["--from-bench", os.path.join(root, "bench/results/calls-h100.json"), "--base", str(base), "--name",
        "h100_sxm_bench", "--out", str(out)])
  assert "leave_one_out:" in capsys.readouterr().out
  prof = Profile.load(str(out))
  summary = prof.calibration_report["summary"]
  assert summary["all_calls"]["after"]["median_abs_rel_err"] < summary["all_calls"]["before"]["median_abs_rel_err"]
  assert {r["kind"] for r in prof.calibration_report["records"]} == {"generate", "train_step"}
  assert committed.calibration.keys() == prof.calibration.keys()
  for kind, factors in committed.calibration.items():
    assert prof.calibration[kind] == pytest.approx(factors, rel=1e-6)


def test_refit_drops_a_lumped_comm_factor_of_an_older_base(tmp_path):
  """A base fitted before all-reduces were priced apart has one `comm_time` for both classes; a refit
  from it does not carry that factor to a class its records never had (FSDP generation here)."""
  from search.calibrate import refit, without_lumped_comm
  old = PROFILE.replace(calibration={"generate": {"time": 1.5, "comm_time": 0.02}, "train_step": {"comm_time": 0.3}})
  assert without_lumped_comm(old).calibration == {"generate": {"time": 1.5}, "train_step": {}}
  split = PROFILE.replace(calibration={"generate": {"comm_time": 0.5, "reduce_time": 2.0}})
  assert without_lumped_comm(split) is split and without_lumped_comm(PROFILE) is PROFILE

  recs = [r for r in _records({"small": SMALL, "large": LARGE}) if r["kind"] == "generate"]  # d1 and t4: no gathers
  written = TRUE.replace(calibration_report={"records": recs, "base_profile": old.to_dict()})
  path = tmp_path / "p.json"
  written.save(str(path))
  fitted = refit(str(path))
  assert "comm_time" not in fitted.calibration["generate"] and "reduce_time" in fitted.calibration["generate"]


def test_refit_keeps_what_the_fit_does_not_set(tmp_path):
  """A refit takes the time terms from the fit and everything else from the written profile: its
  memory size and reserve, a per-kind memory factor measured after the first fit, its notes."""
  from search.calibrate import TIME_TERMS, refit
  recs = _records({"small": SMALL, "large": LARGE})
  written = TRUE.replace(calibration={"train_step": {"time": 9.0, "memory": 1.6}, "generate": {"flops": 1.1}},
                         memory_bytes=135e9, memory_reserve=0.1, notes="measured here",
                         calibration_report={"records": recs, "base_profile": PROFILE.to_dict()})
  path = tmp_path / "p.json"
  written.save(str(path))
  fitted = refit(str(path))
  assert fitted.memory_bytes == 135e9 and fitted.memory_reserve == 0.1 and fitted.notes == "measured here"
  assert fitted.calibration["train_step"]["memory"] == 1.6 and fitted.calibration["generate"]["flops"] == 1.1
  assert fitted.calibration["train_step"]["time"] != 9.0  # time terms: the fit's, not the written ones
  assert set(fitted.calibration["train_step"]) - {"memory"} <= set(TIME_TERMS)


def test_refit_with_added_records_fits_them_once(tmp_path):
  """`refit(add=...)` (search.profile --refit P --add-records R): the added records join the report and the
  fit; one already there (same name and source) is not added twice."""
  from search.calibrate import refit
  recs = _records({"small": SMALL, "large": LARGE})
  written = TRUE.replace(calibration_report={"records": recs[:-1], "base_profile": PROFILE.to_dict()})
  path = tmp_path / "p.json"
  written.save(str(path))
  fewer = refit(str(path))
  more = refit(str(path), add=[recs[-1], recs[0]])
  got = more.calibration_report["records"]
  assert [r["name"] for r in got] == [r["name"] for r in recs]  # recs[0] was there already
  assert more.calibration_report["summary"]["all_calls"]["after"]["calls"] == len(recs)
  assert fewer.calibration_report["summary"]["all_calls"]["after"]["calls"] == len(recs) - 1


def test_refit_drop_kinds_replaces_a_kinds_records(tmp_path):
  """`refit(drop_kinds=...)` (--drop-kinds): the written records of those kinds leave the fit before the added
  ones join (the code they timed changed); other kinds' records stay; an unknown kind is refused by name."""
  from search.calibrate import refit
  recs = _records({"small": SMALL, "large": LARGE})
  train = [r for r in recs if r["kind"] == "train_step"]
  assert train and len(train) < len(recs)
  stale = [dict(r, measured_s=3 * r["measured_s"], source="old code") for r in train]
  others = [r for r in recs if r["kind"] != "train_step"]
  written = TRUE.replace(calibration_report={"records": others + stale, "base_profile": PROFILE.to_dict()})
  path = tmp_path / "p.json"
  written.save(str(path))
  kept = refit(str(path), add=train)
  dropped = refit(str(path), add=train, drop_kinds=["train_step"])
  got = dropped.calibration_report["records"]
  assert [r["name"] for r in got] == [r["name"] for r in others + train]
  assert all(r.get("source") != "old code" for r in got)
  assert len(kept.calibration_report["records"]) == len(others) + 2 * len(train)
  # The fresh records alone fit better than the mix with their stale copies.
  assert (dropped.calibration_report["summary"]["all_calls"]["after"]["median_abs_rel_err"]
          < kept.calibration_report["summary"]["all_calls"]["after"]["median_abs_rel_err"])
  with pytest.raises(ValueError, match=r"drop_kinds \['train'\] are no call kinds"):
    refit(str(path), drop_kinds=["train"])
  with pytest.raises(ValueError, match=r"drop_kinds \['train_step'\] without added records"):
    refit(str(path), drop_kinds=["train_step"])
  with pytest.raises(TypeError, match="the string 'train_step'"):
    refit(str(path), add=train, drop_kinds="train_step")
  # The command line: --refit P --drop-kinds "train_step, " --add-records R.
  from search.profile import main
  (tmp_path / "r.json").write_text(json.dumps({"records": train}))
  main(["--refit", str(path), "--drop-kinds", "train_step, ", "--add-records", str(tmp_path / "r.json"),
        "--out", str(tmp_path / "out.json")])
  cli = Profile.load(str(tmp_path / "out.json"))
  assert [r["name"] for r in cli.calibration_report["records"]] == [r["name"] for r in others + train]
  assert cli.calibration["train_step"] == pytest.approx(dropped.calibration["train_step"], rel=1e-9)

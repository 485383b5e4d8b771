"""bench/realloc.py on the fake CPU devices: one record of the tiny tree carries the results schema the
issue asks for, and `--fit` rebuilds the plans each implementation ran (copy rounds, or one batched
device_put per bucket for files from before them) and fits one profile to several files (`--joint`)."""

import json

from bench import realloc as br


def _calls(variants, label):
  """The batched device_put counts of a variant's buckets that copy anything."""
  return {x.transfer_calls for x in variants[label][0] if x.transfers}


def test_record_schema_and_fits_rebuild_each_implementation(tmp_path, monkeypatch, capsys):
  name, src, dst = br.TRANSITIONS_BY_DEVICES[4][1]  # fsdp4 -> tensor2 (2 of 4): copies in two rounds
  assert name == "fsdp4->tensor2(2 of 4)"
  hw = br.hw_mod.local_default()
  rec = br.bench("tiny", name, src, dst, 1, hw, variants=("onecall",))
  for key in ("model", "transition", "bytes", "reallocate_s", "device_put_s", "raw_copy_s", "predicted_s",
              "peak_bytes_per_device"):
    assert key in rec, key
  assert rec["values_equal"] and rec["transfers"] > 0 and set(rec["reallocate_variants_s"]) == {"onecall"}
  doc = {"card": "cpu", "devices": 8, "implementation": br.IMPLEMENTATION, "bucket_bytes": br.DEFAULT_BUCKET_BYTES,
         "hardware_default": hw.to_dict(), "direct_default": False, "records": [rec]}
  (_, now, _), = br._fit_rows(doc)
  assert _calls(now, "default") == {2} and _calls(now, "onecall") == {1}
  # The same record as a file from before issue rounds: its default ran one batched call per bucket.
  (_, before, _), = br._fit_rows(dict(doc, implementation=br.ONE_ROUND_IMPLEMENTATION))
  assert _calls(before, "default") == {1}
  # --fit --joint over two files (small grids: the plumbing, not the search, is under test).
  monkeypatch.setattr(br, "HBM_GRID", (2e12,))
  monkeypatch.setattr(br, "LATENCY_GRID", (2e-5,))
  monkeypatch.setattr(br, "DISPATCH_GRID", (0.0, 1e-4))
  paths = []
  for i, data in enumerate((doc, dict(doc, implementation=br.ONE_ROUND_IMPLEMENTATION))):
    paths.append(str(tmp_path / f"run{i}.json"))
    with open(paths[-1], "w") as f:
      json.dump(data, f)
  calls = []
  monkeypatch.setattr(br, "_fit_rows", lambda data, f=br._fit_rows: (calls.append(data["implementation"]), f(data))[1])
  capsys.readouterr()
  br.fit_joint(paths)
  out = capsys.readouterr().out
  assert calls == [br.IMPLEMENTATION, br.ONE_ROUND_IMPLEMENTATION]
  assert "joint fit of 2 runs" in out and "within 25%, default call: joint " in out
  assert out.count(name) == 2  # one line per record of each file

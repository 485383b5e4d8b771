"""Calibrating a hardware profile against timed real calls (`python -m search.profile --calibrate`).

Method (search/README.md has the measured error):

1. Cases (`default_cases`): generation (prefill + decode steps, sampling, no early EOS), inference
   (log-probs with the LM head, values with the scalar head) and a train step (next-token loss,
   AdamW), for two model shapes and the layouts that fit the machine: one device, and every device
   (tensor-parallel generation and log-probs, FSDP train step and values). GPU: LLaMA-shaped
   350M and 1.3B, bf16 compute with fp32 master weights, PPO-like lengths (prompt 128 + 128 new
   tokens, sequences of 256). CPU: two tiny shapes in fp32.
2. Each case runs the library's own jitted call (`real_jax.generation.generate`, `inference.logprobs` /
   `values`, `train_step.make_train_step`) on inputs already in the layout: one warm-up (compile),
   then the median of `reps` timed runs. Records are written after every case.
3. The analytic estimator tier prices each case with the base profile. Per call its counts become
   seconds by term: flops time, HBM time, comm time (gathers / scatters and all-reduces apart) and
   decode steps x layers. The fitted model is `time x (call_overhead_s + flops time + bytes_time x HBM
   time + comm_time x gather comm time + reduce_time x all-reduce comm time + steps x layers x
   step_overhead_s)`, with `time`, `bytes_time`, `comm_time`, `reduce_time` and `call_overhead_s` per
   kind and one `step_overhead_s` (`CallCost.parts`): matmuls and memory-bound kernels add up (the
   uncalibrated estimate takes their max), communication is partly hidden. A comm factor is fitted
   only where some case of the kind has that class of traffic; the other stays at its base (1 = all
   of the link time), so FSDP cases say nothing about tensor parallelism's all-reduces. The fit minimises
   the squared log-ratio predicted / measured over the timed calls, plus 1e-4 x the squared log of
   each factor's change from its start (1, or the base profile's value), so factors the cases
   cannot tell apart stay there, plus a steep penalty on physically impossible rates (`_floors`:
   matmuls faster than the measured matmul rate, decode reads faster than the measured HBM
   bandwidth); Levenberg-Marquardt in numpy. A fit that does not lower the error keeps the base
   profile. Each record also says what ran (`decode_kv_slots`, `fused_attention`: the CallSpec
   fields), so a profile fitted on one code version prices another's records as they ran.
4. Held-out checks, both reported: leave-one-out (each call predicted by the fit to all the others)
   and size extrapolation (the fit repeated on every model shape but the largest, which it then
   predicts, as planning a bigger model does). The written profile is fitted on all calls.

Layering: like `search/__main__.py`, this module is a composition root. It imports `real_jax`
lazily inside `time_case` (and `bench_records`) to build and time models; the fit (`fit`, `report`,
`predict`) needs only numbers.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from search.estimator import KINDS, CallSpec, Estimator, ModelShape
from search.plan import layout_from_text
from search.profile import Profile
from sharding import Layout

REG = 1e-4          # weight of the squared log-change of each fitted factor
FLOOR = 30.0        # weight of a fitted rate's log-excess over the profile's measured one (see `_floors`)
STEP_REF = 1e-5     # reference step overhead (s) when the base profile has none (a kernel launch or two)

# Model shapes (ModelConfig fields) used when `real_jax.models.PRESETS` lacks the name. "350m" and
# "1.3b" are LLaMA-shaped with OPT-like widths and depths (vocab 32000); "tiny2" is a CPU shape.
SHAPES = {
    "350m": dict(vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, head_dim=64, d_ff=2816,
                 rms_eps=1e-5, max_seq_len=4096),
    "1.3b": dict(vocab_size=32000, d_model=2048, n_layers=24, n_heads=32, n_kv_heads=32, head_dim=64, d_ff=5504,
                 rms_eps=1e-5, max_seq_len=4096),
    "tiny2": dict(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=256),
}


_CASE = re.compile(r"^(\S+) (generate|logprobs|values|train) (\S+) b(\d+)(?:p(\d+)n(\d+)|s(\d+))(?: remat=(\w+))?$")


@dataclasses.dataclass(frozen=True)
class Case:
  """One timed call: model shape name, kind, head ("lm" / "scalar"), layout text and sizes; remat
  (train steps): the model's rematerialisation ("" = the shape's default, none)."""

  model: str
  kind: str
  head: str
  layout: str
  batch: int
  seq_len: int = 0
  prompt_len: int = 0
  new_tokens: int = 0
  remat: str = ""

  @property
  def name(self) -> str:
    size = f"b{self.batch}p{self.prompt_len}n{self.new_tokens}" if self.kind == "generate" else \
        f"b{self.batch}s{self.seq_len}"
    what = {"generate": "generate", "train_step": "train", "inference": "logprobs" if self.head == "lm" else "values"}
    return f"{self.model} {what[self.kind]} {self.layout} {size}" + (f" remat={self.remat}" if self.remat else "")

  @classmethod
  def parse(cls, text: str) -> Case:
    """The case a `name` describes, e.g. "1.3b generate 0:2/d2f1t1 b128p128n512",
    "350m values 0:2/d2f1t1 b128s640", "1.3b train 0:2/d1f2t1 b32s640 remat=full"."""
    m = _CASE.match(text.strip())
    if not m:
      raise ValueError(f"calibration case {text!r}: expected 'MODEL generate|logprobs|values|train START:SIZE/dDfFtT "
                       "bBpPnN' (generate) or '... bBsS [remat=none|full|dots]', e.g. "
                       "'1.3b generate 0:2/d2f1t1 b128p128n512'")
    model, what, layout, b, p, n, s, remat = m.groups()
    layout_from_text(layout, what=f"calibration case {text!r}")
    if what == "generate":
      if p is None or remat:
        raise ValueError(f"calibration case {text!r}: generation takes bBpPnN sizes and no remat")
      return cls(model, "generate", "lm", layout, int(b), prompt_len=int(p), new_tokens=int(n))
    if s is None:
      raise ValueError(f"calibration case {text!r}: {what} takes bBsS sizes")
    if remat and what != "train":
      raise ValueError(f"calibration case {text!r}: remat applies to train steps only")
    kind = "train_step" if what == "train" else "inference"
    return cls(model, kind, "scalar" if what == "values" else "lm", layout, int(b), seq_len=int(s), remat=remat or "")

  def spec(self, shape: ModelShape, decode_kv_slots: float = 0.0, fused_attention: bool = True) -> CallSpec:
    return CallSpec(self.name, self.model, self.kind, self.batch, shape, seq_len=self.seq_len,
                    prompt_len=self.prompt_len, new_tokens=self.new_tokens, trained=self.kind == "train_step",
                    head=self.head, decode_kv_slots=decode_kv_slots, fused_attention=fused_attention)


def default_cases(platform: str, num_devices: int, models: Sequence[str] = (),
                  kinds: Sequence[str] = KINDS) -> list[Case]:
  """The calibration cases for this machine (see module docstring).

  Order: every model on one device, then every model on all devices (one device: larger sizes), so
  a run cut short by its budget still has both model shapes (for the held-out check); a model's
  generation and log-probs on one layout are adjacent and share the built model.
  """
  gpu = platform != "cpu"
  models = list(models) or (["350m", "1.3b"] if gpu else ["tiny", "tiny2"])
  b, p, m, t = (32, 128, 128, 256) if gpu else (8, 16, 8, 32)
  n = num_devices
  one = "0:1/d1f1t1"
  tp = min(n, 4)  # Tensor parallelism over at most 4 devices (the tiny shapes have 4 heads), data beyond.
  tensor = f"0:{n}/d{n // tp}f1t{tp}"
  fsdp = f"0:{n}/d1f{n}t1"
  out = []
  for model in models:
    out += [Case(model, "generate", "lm", one, b, prompt_len=p, new_tokens=m),
            Case(model, "inference", "lm", one, b, seq_len=t),
            Case(model, "inference", "scalar", one, b, seq_len=t),
            Case(model, "train_step", "lm", one, b // 2, seq_len=t)]
  for model in models:
    if n > 1:
      out += [Case(model, "generate", "lm", tensor, b, prompt_len=p, new_tokens=m),
              Case(model, "inference", "lm", tensor, b, seq_len=t),
              Case(model, "inference", "scalar", fsdp, b, seq_len=t),
              Case(model, "train_step", "lm", fsdp, max(b // 2, n), seq_len=t)]
    else:  # One device: more sizes instead of more layouts.
      out += [Case(model, "generate", "lm", one, 2 * b, prompt_len=p, new_tokens=m),
              Case(model, "train_step", "lm", one, b, seq_len=t)]
  bad = set(kinds) - set(KINDS)
  if bad:
    raise ValueError(f"calibration kinds {sorted(bad)}: expected some of {KINDS}")
  return [c for c in out if c.kind in kinds]


# -- timing real calls ---------------------------------------------------------------------------


def model_config(name: str, platform: str, remat: str = ""):
  """The ModelConfig of a shape name: bf16 compute with fp32 masters on GPU, fp32 on CPU; `remat` if set."""
  from real_jax.models import PRESETS, ModelConfig
  dt = dict(dtype="bfloat16", param_dtype="float32") if platform != "cpu" else dict(dtype="float32",
                                                                                   param_dtype="float32")
  if remat:
    dt["remat"] = remat
  if name in PRESETS:
    return dataclasses.replace(PRESETS[name], **dt)
  if name not in SHAPES:
    raise ValueError(f"calibration model {name!r}: not a real_jax preset nor one of {sorted(SHAPES)}")
  return ModelConfig(**SHAPES[name], **dt)


def _median_time(fn: Callable[[], Any], reps: int) -> tuple[float, list[float], float]:
  """(median seconds, all timed seconds, warm-up seconds) of fn() with its result blocked on."""
  import jax
  t = time.perf_counter()
  jax.block_until_ready(fn())
  warm = time.perf_counter() - t
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times), times, warm


def _sampling(case: Case):
  """The SamplingConfig a generation case runs with: no EOS (every row decodes all new tokens)."""
  from real_jax.generation import SamplingConfig
  return SamplingConfig(max_new_tokens=case.new_tokens, temperature=1.0, eos_id=None, bucket=case.prompt_len)


_BUILT: dict[str, Any] = {}  # The last built (graphdef, state), reused by the next case of the same model/layout/head.


def _runner(case: Case, cfg, layout: Layout) -> Callable[[], Any]:
  """A closure that runs the case's real call once (the model built and the inputs placed here)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from real_jax import inference
  from real_jax._calls import batch_sharding
  from real_jax.generation import generate
  from real_jax.models import create_model
  from real_jax.optim import OptimizerConfig
  from real_jax.train_step import init_train_state, make_train_step, next_token_loss

  rng = np.random.default_rng(0)
  length = case.prompt_len if case.kind == "generate" else case.seq_len
  shape = (case.batch, length)
  tokens = jax.device_put(jnp.asarray(rng.integers(3, cfg.vocab_size, size=shape), jnp.int32),
                          batch_sharding(layout, shape))
  mask = jax.device_put(jnp.ones(shape, bool), batch_sharding(layout, shape))
  if case.kind != "train_step":
    key = (case.model, case.layout, case.head)
    if _BUILT.get("key") != key:
      _BUILT.clear()  # Free the previous model before building the next.
      gc.collect()
      _BUILT.update(key=key, split=nnx.split(create_model(cfg, layout, seed=0, head=case.head)))
    graphdef, state = _BUILT["split"]
  if case.kind == "generate":
    sc = _sampling(case)
    key = jax.random.key(0)
    return lambda: generate((graphdef, state), tokens, mask, key, sc, layout).tokens
  if case.kind == "inference":
    if case.head == "lm":
      return lambda: inference.logprobs((graphdef, state), tokens, mask, layout)
    return lambda: inference.values((graphdef, state), tokens, mask, layout)
  _BUILT.clear()  # The train state is built fresh (its parameters are donated by every step).
  gc.collect()
  model = create_model(cfg, layout, seed=0, head=case.head)
  opt = OptimizerConfig(lr=1e-5, warmup_steps=10, decay_steps=1000)
  graphdef = nnx.graphdef(model)
  holder = [init_train_state(model, opt, layout)]
  del model
  batch = {"tokens": tokens, "mask": mask}
  step = make_train_step(graphdef, next_token_loss, opt, layout, params=holder[0].params, batch_example=batch)

  def run():
    holder[0], metrics = step(holder[0], batch)  # The old state is donated.
    return metrics["loss"]
  return run


def time_case(case: Case, platform: str, reps: int) -> dict[str, Any]:
  """Times one case; the record holds the case, its model shape numbers and the measured seconds."""
  from real_jax.plan_inputs import decode_kv_slots, fused_attention, model_shape
  cfg = model_config(case.model, platform, case.remat)
  layout = layout_from_text(case.layout, what=f"calibration case {case.name}")
  # What the analytic tier must know of the kernels that run here (`CallSpec` fields).
  kernels = {"fused_attention": fused_attention(cfg, platform)}
  if case.kind == "generate":
    kernels["decode_kv_slots"] = decode_kv_slots(cfg, _sampling(case), case.prompt_len, platform)
  rec: dict[str, Any] = {"name": case.name, **dataclasses.asdict(case),
                         "shape": dataclasses.asdict(model_shape(cfg, case.head)), **kernels}
  t0 = time.perf_counter()
  try:
    run = _runner(case, cfg, layout)
    med, times, warm = _median_time(run, reps)
    rec.update(measured_s=med, times_s=times, warmup_s=warm)
  except Exception as e:  # noqa: BLE001  (one failing case, e.g. out of memory, must not end the run)
    rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
  finally:
    run = None
    gc.collect()
  rec["wall_s"] = time.perf_counter() - t0
  return rec


# -- predictions and the fit -------------------------------------------------------------------


def _spec_layout(rec: dict) -> tuple[CallSpec, Layout]:
  """The record's CallSpec and layout. Records written before `decode_kv_slots` / `fused_attention`
  were recorded get the CallSpec defaults (prompt + new / 2 slots; fused attention)."""
  case = Case(**{f.name: rec.get(f.name, f.default) for f in dataclasses.fields(Case)})
  spec = case.spec(ModelShape(**rec["shape"]), float(rec.get("decode_kv_slots", 0.0)),
                   bool(rec.get("fused_attention", True)))
  return spec, layout_from_text(rec["layout"])


def predict(profile: Profile, rec: dict) -> float:
  """The analytic estimator's seconds for one recorded case under `profile`."""
  spec, layout = _spec_layout(rec)
  return Estimator(profile, mode="analytic", cache_dir="").seconds(spec, layout)


@dataclasses.dataclass(frozen=True)
class _Param:
  name: str     # "time", "bytes_time", "comm_time", "reduce_time", "call_overhead_s" (per kind) or "step_overhead_s"
  kind: str     # call kind, "" for step_overhead_s
  base: float   # value at u = 0 (the reference the regulariser pulls towards)


def _terms(profile: Profile, rec: dict) -> dict[str, float]:
  """The case's seconds by term under `profile`, before any time calibration: flops and HBM time,
  gather / scatter comm time ("comm") and all-reduce comm time ("comm_reduce"), each with the base
  profile's factor applied, decode steps x layers."""
  spec, layout = _spec_layout(rec)
  cost = Estimator(profile, mode="analytic", cache_dir="").cost(spec, layout)
  cal = profile.calibration.get(spec.kind, {})
  gather_s, reduce_s = cost.link_seconds(profile)
  return {"flops": cost.flops / profile.matmul_flops, "bytes": cost.hbm_bytes / profile.hbm_bandwidth,
          "comm": gather_s * float(cal.get("comm_time", 1.0)),
          "comm_reduce": reduce_s * float(cal.get("reduce_time", 1.0)), "step_units": cost.steps * spec.shape.n_layers,
          "latency_s": cost.latency_s(profile)}  # Per-collective latency: fixed, not fitted, outside `time`.


def _params(profile: Profile, recs: Sequence[dict], terms: Sequence[dict]) -> list[_Param]:
  """What the fit may change: per kind timed, `time`, `bytes_time`, `call_overhead_s`, `comm_time`
  (where a call gathers or scatters) and `reduce_time` (where one all-reduces); and `step_overhead_s`
  where a call decodes."""
  out = []
  for kind in KINDS:
    rows = [t for r, t in zip(recs, terms) if r["kind"] == kind]
    if not rows:
      continue
    cal = profile.calibration.get(kind, {})
    out.append(_Param("time", kind, float(cal.get("time", 1.0))))
    out.append(_Param("bytes_time", kind, float(cal.get("bytes_time", 1.0))))
    out.append(_Param("call_overhead_s", kind, 1.0))  # Relative to the kind's base overhead.
    if any(t["comm"] > 0 for t in rows):
      out.append(_Param("comm_time", kind, 1.0))  # Relative to the base comm term (base comm_time applied).
    if any(t.get("comm_reduce", 0.0) > 0 for t in rows):
      out.append(_Param("reduce_time", kind, 1.0))  # Likewise, base reduce_time applied.
  if any(t["step_units"] > 0 for t in terms):
    out.append(_Param("step_overhead_s", "", profile.step_overhead_s or STEP_REF))
  return out


def _predict_terms(params: list[_Param], u: np.ndarray, recs: Sequence[dict], terms: Sequence[dict],
                   profile: Profile) -> np.ndarray:
  val = {(p.name, p.kind): p.base * math.exp(x) for p, x in zip(params, u)}
  step = val.get(("step_overhead_s", ""), profile.step_overhead_s)
  out = []
  for r, t in zip(recs, terms):
    k = r["kind"]
    cal = profile.calibration.get(k, {})
    over = val.get(("call_overhead_s", k), 1.0) * float(cal.get("call_overhead_s", profile.call_overhead_s))
    scale = val.get(("time", k), float(cal.get("time", 1.0)))
    compute = t["flops"] + val.get(("bytes_time", k), 1.0) * t["bytes"]
    comm = t["comm"] * val.get(("comm_time", k), 1.0) + t.get("comm_reduce", 0.0) * val.get(("reduce_time", k), 1.0)
    out.append(scale * (over + compute + comm + t["step_units"] * step) + t.get("latency_s", 0.0))
  return np.asarray(out)


def _floors(params: list[_Param], u: np.ndarray, kinds: Sequence[str], profile: Profile,
            rates: dict | None = None) -> np.ndarray:
  """Log-excess of each fitted rate over the machine's measured one (0 where it is not faster).

  rates: the rates measured on the machine being calibrated (`calibrate`'s micro-benchmarks:
  `matmul_flops`, `hbm_bandwidth`); the profile's own where absent. With `--base` the profile holds
  another card's rates, so on a faster card (H200 against an H100 base: HBM 4.0 against 2.58 TB/s)
  the floors sit at profile rate / measured rate, below 1.

  The time model's coefficient of the flops time is `time`: below 1 the calls would run matmuls
  faster than the profile's measured matmul rate. For generation the coefficient of the HBM time is
  `time x bytes_time`: its bytes are the weights and KV cache every decode step must read, so below 1
  it would read them faster than the measured HBM bandwidth. Such a fit explains small, short calls
  by the wrong term (a large `time` with a tiny `bytes_time` instead of per-step overhead) and then
  under-predicts long generation, whose KV reads grow with the sequence (the 1-GPU profile that
  predicted bench/results/plans-h100.json fitted time x bytes_time = 0.57). `fit` adds these, times
  FLOOR, to its residuals. (Inference and train bytes are coarse activation estimates: no floor.)"""
  rates = rates or {}
  lo_t = profile.matmul_flops / float(rates.get("matmul_flops") or profile.matmul_flops)
  lo_bt = profile.hbm_bandwidth / float(rates.get("hbm_bandwidth") or profile.hbm_bandwidth)
  val = {(p.name, p.kind): p.base * math.exp(x) for p, x in zip(params, u)}
  out = []
  for kind in kinds:
    cal = profile.calibration.get(kind, {})
    t = val.get(("time", kind), float(cal.get("time", 1.0)))
    out.append(min(0.0, math.log(t / lo_t)))
    if kind == "generate":
      out.append(min(0.0, math.log(t * val.get(("bytes_time", kind), float(cal.get("bytes_time", 1.0))) / lo_bt)))
  return np.asarray(out)


def _levenberg_marquardt(resid: Callable[[np.ndarray], np.ndarray], u0: np.ndarray, iters: int = 200) -> np.ndarray:
  """argmin |resid(u)|^2 by Levenberg-Marquardt with a central-difference Jacobian; u clipped to +-15."""
  u, mu = u0.copy(), 1e-2
  r = resid(u)
  cost = float(r @ r)
  for _ in range(iters):
    h = 1e-5
    jac = np.stack([(resid(u + h * e) - resid(u - h * e)) / (2 * h) for e in np.eye(len(u))], axis=1)
    g = jac.T @ r
    a = jac.T @ jac
    improved = False
    for _ in range(20):
      step = np.linalg.solve(a + mu * (np.diag(np.diag(a)) + np.eye(len(u))), -g)
      cand = np.clip(u + step, -15.0, 15.0)
      rc = resid(cand)
      if float(rc @ rc) < cost:
        u, r, cost, mu, improved = cand, rc, float(rc @ rc), max(mu / 3, 1e-9), True
        break
      mu *= 4
    if not improved or float(np.abs(step).max()) < 1e-9:
      break
  return u


def _log_err(pred: np.ndarray, meas: np.ndarray) -> float:
  return float(np.sum(np.log(pred / meas) ** 2))


def without_lumped_comm(profile: Profile) -> Profile:
  """`profile` with its `comm_time` factors dropped if it was fitted before all-reduces were priced
  apart (`reduce_time` nowhere): such a factor priced every collective of its kind, so it says nothing
  about either class alone, and kept as a base it would price the class its cases never had (an H100
  profile's tensor-parallel generation factor, 0.016, pricing FSDP generation's gathers)."""
  cal = profile.calibration
  if any("reduce_time" in c for c in cal.values()) or not any("comm_time" in c for c in cal.values()):
    return profile
  return profile.replace(calibration={k: {n: v for n, v in c.items() if n != "comm_time"} for k, c in cal.items()})


def fit(profile: Profile, recs: Sequence[dict], rates: dict | None = None) -> tuple[Profile, dict[str, Any]]:
  """The profile with fitted time terms (module docstring, step 3) and what was fitted.

  recs: timed records (with `measured_s`, no `error`). Count factors (`flops`, `bytes`, `comm`,
  `memory`) are kept. rates: the machine's measured rates, for the floors (`_floors`). A base fitted
  before all-reduces were priced apart starts without its lumped `comm_time` (`without_lumped_comm`).
  """
  profile = without_lumped_comm(profile)
  recs = [r for r in recs if r.get("measured_s")]
  if not recs:
    raise ValueError("calibration fit: no timed calls (every case failed or none ran)")
  terms = [_terms(profile, r) for r in recs]
  params = _params(profile, recs, terms)
  meas = np.asarray([r["measured_s"] for r in recs])

  kinds = sorted({r["kind"] for r in recs})

  def resid(u):
    pred = _predict_terms(params, u, recs, terms, profile)
    return np.concatenate([np.log(pred / meas), math.sqrt(REG) * u, FLOOR * _floors(params, u, kinds, profile, rates)])

  before = np.asarray([predict(profile, r) for r in recs])
  u = _levenberg_marquardt(resid, np.zeros(len(params)))
  after = _predict_terms(params, u, recs, terms, profile)
  info = {"calls": len(recs), "kinds": sorted({r["kind"] for r in recs}),
          "models": sorted({r["model"] for r in recs}), "log_sq_err_before": _log_err(before, meas),
          "log_sq_err_after": _log_err(after, meas)}
  if info["log_sq_err_after"] >= info["log_sq_err_before"]:
    info["kept_base"] = "the fit did not lower the error"
    return profile, info
  cal = {k: dict(v) for k, v in profile.calibration.items()}
  step = profile.step_overhead_s
  fitted = {}
  for p, x in zip(params, u):
    v = p.base * math.exp(float(x))
    if p.name == "step_overhead_s":
      step = v
      fitted[p.name] = v
    elif p.name == "call_overhead_s":
      kc = cal.setdefault(p.kind, {})
      kc[p.name] = v * float(kc.get(p.name, profile.call_overhead_s))
      fitted[f"{p.kind}.{p.name}"] = kc[p.name]
    else:
      if p.name in ("comm_time", "reduce_time"):
        v *= float(cal.get(p.kind, {}).get(p.name, 1.0))
      cal.setdefault(p.kind, {})[p.name] = v
      fitted[f"{p.kind}.{p.name}"] = v
  info["fitted"] = fitted
  return profile.replace(calibration=cal, step_overhead_s=step), info


def _errors(pred: Sequence[float], meas: Sequence[float]) -> dict[str, float]:
  rel = [abs(p / m - 1.0) for p, m in zip(pred, meas)]
  return {"calls": len(rel), "median_abs_rel_err": statistics.median(rel) if rel else float("nan"),
          "max_abs_rel_err": max(rel) if rel else float("nan")}


def report(base: Profile, records: Sequence[dict], rates: dict | None = None) -> tuple[Profile, dict[str, Any]]:
  """Fits `base` to the timed records; returns the fitted profile and the calibration report parts
  (per record: predicted before, after, leave-one-out and by the size-extrapolation fit, with their
  relative errors; summaries of |relative error| per set)."""
  timed = [r for r in records if r.get("measured_s")]
  fitted, info = fit(base, timed, rates)
  models = list(dict.fromkeys(r["model"] for r in timed))
  held: dict[str, Any] = {"note": "needs timed calls of at least two model shapes"}
  hold_fit = None
  if len(models) >= 2:
    train = [r for r in timed if r["model"] != models[-1]]
    hold_fit, hold_info = fit(base, train, rates)
    held = {"fit_on": models[:-1], "held_out": models[-1], "fit": hold_info}
  loo = {}
  if len(timed) >= 2:
    for i, r in enumerate(timed):
      others, _ = fit(base, timed[:i] + timed[i + 1:], rates)
      loo[id(r)] = predict(others, r)
  out = []
  for r0 in records:
    r = dict(r0)
    if r.get("measured_s"):
      m = r["measured_s"]
      r["predicted_before_s"] = predict(base, r)
      r["predicted_after_s"] = predict(fitted, r)
      r["rel_err_before"] = r["predicted_before_s"] / m - 1.0
      r["rel_err_after"] = r["predicted_after_s"] / m - 1.0
      if id(r0) in loo:
        r["predicted_leave_one_out_s"] = loo[id(r0)]
        r["rel_err_leave_one_out"] = loo[id(r0)] / m - 1.0
      if hold_fit is not None:
        r["role"] = "held_out" if r["model"] == models[-1] else "fit"
        r["predicted_holdout_fit_s"] = predict(hold_fit, r)
        r["rel_err_holdout_fit"] = r["predicted_holdout_fit_s"] / m - 1.0
    out.append(r)
  ok = [r for r in out if r.get("measured_s")]
  meas = [r["measured_s"] for r in ok]
  summary = {"all_calls": {"before": _errors([r["predicted_before_s"] for r in ok], meas),
                           "after": _errors([r["predicted_after_s"] for r in ok], meas)}}
  if loo:
    summary["leave_one_out"] = {"before": summary["all_calls"]["before"],
                                "after": _errors([r["predicted_leave_one_out_s"] for r in ok], meas)}
  if hold_fit is not None:
    for role in ("fit", "held_out"):
      sel = [r for r in ok if r["role"] == role]
      summary[f"{role}_calls_of_holdout_fit"] = {
          "before": _errors([r["predicted_before_s"] for r in sel], [r["measured_s"] for r in sel]),
          "after": _errors([r["predicted_holdout_fit_s"] for r in sel], [r["measured_s"] for r in sel])}
  return fitted, {"fit": info, "holdout": held, "summary": summary, "records": out}


# -- the run -----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
  import jax
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "devices": jax.device_count(), "jax": jax.__version__}


def calibrate(base: Profile, *, out: str = "", budget_s: float = 240.0, reps: int = 3,
              cases: Sequence[Case] | None = None, micro: dict | None = None,
              log: Callable[[str], None] = print) -> Profile:
  """Times the cases within `budget_s` (from now), fits `base`, returns (and writes to `out`) the
  profile with its `calibration_report`. The profile file is rewritten after every timed case."""
  import jax
  t0 = time.perf_counter()
  mach = machine()
  cases = list(cases) if cases is not None else default_cases(mach["platform"], jax.device_count())
  head = {"method": "search/calibrate.py (module docstring); errors: predicted / measured - 1",
          "machine": mach, "date": datetime.datetime.now().isoformat(timespec="seconds"), "base": base.name,
          "budget_s": budget_s, "reps": reps, "micro": micro or {},
          "base_profile": base.replace(calibration_report={}).to_dict()}
  records: list[dict] = []
  skipped: list[str] = []

  def save(prof: Profile, rep: dict) -> None:
    if out:
      prof.replace(calibration_report=rep).save(out)

  for i, case in enumerate(cases):
    spent = time.perf_counter() - t0
    per = spent / len(records) if records else 0.0
    if spent + 1.5 * per > budget_s:
      skipped += [c.name for c in cases[i:]]
      log(f"budget: {spent:.0f} s of {budget_s:.0f} spent, {len(cases) - i} case(s) not run")
      break
    rec = time_case(case, mach["platform"], reps)
    records.append(rec)
    msg = f"{rec['measured_s'] * 1e3:.2f} ms" if "measured_s" in rec else rec["error"]
    log(f"[{time.perf_counter() - t0:6.1f} s] {case.name}: {msg}")
    save(base, head | {"status": f"timing: {len(records)} of {len(cases)} cases", "records": records,
                       "skipped": skipped})
  _BUILT.clear()
  fitted, rep = report(base, records, micro)
  rep = head | {"status": "fitted", "wall_s": time.perf_counter() - t0, "skipped": skipped} | rep
  notes = (f"{base.notes} | calibrated against {len(rep['records'])} timed calls on {mach['device_kind']} "
           f"x{mach['devices']} (jax {mach['jax']}, {head['date']}): see calibration_report").strip(" |")
  fitted = fitted.replace(notes=notes, calibration_report=rep)
  if out:
    fitted.save(out)
  return fitted


TIME_TERMS = ("time", "bytes_time", "comm_time", "reduce_time", "call_overhead_s")  # what `fit` sets per kind


def refit(path: str, base: Profile | None = None, add: Sequence[dict] = (), drop_kinds: Sequence[str] = ()) -> Profile:
  """Fits again from the records of a profile written by `calibrate` (e.g. a run cut off before its
  fit, or after changing the fit, or with records added); `base` defaults to the base profile that run
  started from. The time terms come from the fit; everything else stays as the written profile has it:
  its memory (`memory_bytes`, `memory_reserve`, per-kind count factors such as a measured `memory`) and
  its notes. (Without this, a refit of search/profiles/h200_4gpu.json on 2026-11-27 fell back to its H100
  base's 76 GB and lost the train step's measured memory factor, and three plans the search then found
  feasible ran out of memory.)

  drop_kinds: call kinds whose written records leave the fit before `add` joins, for when the code those
  calls ran has changed (the train step's layer split of 2026-11-27: its old records timed the slow form)."""
  written = Profile.load(path)
  rep = dict(written.calibration_report)
  if isinstance(drop_kinds, str):
    raise TypeError(f"refit: drop_kinds must be a list of call kinds, got the string {drop_kinds!r}")
  unknown = set(drop_kinds) - set(KINDS)
  if unknown:
    raise ValueError(f"refit: drop_kinds {sorted(unknown)} are no call kinds (kinds: {list(KINDS)})")
  orphaned = set(drop_kinds) - {r["kind"] for r in add}
  if orphaned:  # The fit sets only kinds with records: a dropped kind would fall back to the base's terms.
    raise ValueError(f"refit: drop_kinds {sorted(orphaned)} without added records of that kind; its time "
                     "terms would fall back to the base profile's (add the records timed again)")
  if drop_kinds:
    rep["records"] = [r for r in rep.get("records", []) if r["kind"] not in drop_kinds]
  if add:  # Records added (e.g. in-plan calls, bench/plans.py --call-records); one of each name and source.
    have = {(r["name"], r.get("source", "")) for r in rep.get("records", [])}
    rep["records"] = list(rep.get("records", [])) + [r for r in add if (r["name"], r.get("source", "")) not in have]
  if not rep.get("records"):
    raise ValueError(f"{path}: no calibration_report.records to fit")
  if base is None:
    if "base_profile" not in rep:
      raise ValueError(f"{path}: calibration_report has no base_profile; pass the base profile (--base)")
    base = Profile.from_dict(rep["base_profile"])
  fitted, new = report(base, rep["records"], rep.get("micro"))
  rep.update(new, status="refitted", base=base.name)
  cal = {k: dict(v) for k, v in fitted.calibration.items()}
  for kind, factors in written.calibration.items():
    cal.setdefault(kind, {}).update({n: v for n, v in factors.items() if n not in TIME_TERMS})
  return fitted.replace(calibration=cal, memory_bytes=written.memory_bytes, memory_reserve=written.memory_reserve,
                        notes=written.notes, calibration_report=rep)


def bench_records(path: str) -> list[dict]:
  """Timed calls from a `bench/generate.py` + `bench/train.py` result (`bench/results/calls-<card>.json`),
  as calibration records: generation (bf16 weights, prompt + new tokens forced) and train steps
  (bf16 compute, fp32 masters, the recorded remat), in the file's order.

  What ran: the `generate` list's records come from the stacked decode loop (their `scan_layers`
  field is its option), which read all prompt + new slots of the cache every step; attention was
  XLA's unfused path unless a record names `"attention": "cudnn"` (calls-h100.json's `train` list
  predates the cuDNN default)."""
  import json

  from real_jax.models import get_config
  from real_jax.plan_inputs import model_shape
  with open(path) as f:
    doc = json.load(f)
  out = []
  for r in doc.get("generate", []):
    if not r.get("time_s"):
      continue
    t = r["tensor"]
    case = Case(r["model"], "generate", "lm", f"0:{t}/d1f1t{t}", r["batch"], prompt_len=r["prompt"],
                new_tokens=r["new_tokens"])
    shape = model_shape(get_config(r["model"], dtype="bfloat16", param_dtype="bfloat16"), "lm")
    out.append({"name": case.name, **dataclasses.asdict(case), "shape": dataclasses.asdict(shape),
                "decode_kv_slots": float(r["prompt"] + r["new_tokens"]),
                "fused_attention": r.get("attention") == "cudnn", "measured_s": r["time_s"], "source": path})
  for r in doc.get("train", []):
    if not r.get("step_s"):
      continue
    axes = dict(kv.split("=") for kv in r["layout"].split(","))
    d, f, t = (int(axes.get(a, 1)) for a in ("data", "fsdp", "tensor"))
    case = Case(r["model"], "train_step", "lm", f"0:{d * f * t}/d{d}f{f}t{t}", r["batch"], seq_len=r["seq"],
                remat=r["remat"])
    shape = model_shape(get_config(r["model"], dtype="bfloat16", param_dtype="float32", remat=r["remat"]), "lm")
    out.append({"name": case.name, **dataclasses.asdict(case),
                "shape": dataclasses.asdict(shape), "fused_attention": r.get("attention") == "cudnn",
                "measured_s": r["step_s"], "source": path})
  return out


def summary_lines(profile: Profile) -> list[str]:
  """A short human summary of a calibrated profile's report."""
  rep = profile.calibration_report
  lines = []
  for name, s in rep.get("summary", {}).items():
    b, a = s["before"], s["after"]
    lines.append(f"{name}: {a['calls']} calls, |rel err| median {b['median_abs_rel_err']:.0%} -> "
                 f"{a['median_abs_rel_err']:.0%}, max {b['max_abs_rel_err']:.0%} -> {a['max_abs_rel_err']:.0%}")
  fitted = rep.get("fit", {}).get("fitted", {})
  if fitted:
    lines.append("fitted: " + ", ".join(f"{k}={v:.3g}" for k, v in fitted.items()))
  return lines


__all__ = ["Case", "bench_records", "calibrate", "default_cases", "fit", "predict", "refit", "report",
           "summary_lines", "time_case"]

"""Cost of one call under one layout: per-device flops, memory traffic, communication and memory.

Two tiers (search/README.md has the method and its measured error):

* **compiled** - the real jitted call is lowered and compiled on abstract inputs
  (`jax.ShapeDtypeStruct`s with shardings; nothing allocated) through the call's own `lower(layout)`
  callback, which `real_jax.plan_inputs` builds from the jitted functions that run. Per-device flops
  and bytes come from `cost_analysis()`, the peak from `memory_analysis()`, communication from the
  collectives in `compiled.as_text()` (`search.hlo`). XLA counts a loop body once, so the callback
  returns parts (`compiled_cost`): generation = `main` (the sampler: prefill and one iteration of each
  decode while loop; its memory is the real peak with the whole KV cache) + `decode_extra` x `decode`
  (one iteration of the layered decode loop); a micro-batched call also returns `flat` (the same call
  without the micro-batch loop) for its flops and bytes; a scanned layer loop and a chunked LM head
  get the missing iterations from the analytic tier (`layer_loop_correction`,
  `logits_chunk_correction`). Used where the layout fits the local device count; cached on disk.
* **analytic** - the same quantities from the model's shape numbers and the strategy (FLOPs per
  token; weights, activations and KV cache bytes; FSDP all-gathers / reduce-scatters, tensor-parallel
  all-reduces per layer, data-parallel gradient all-reduce), times per-kind calibration factors
  fitted against the compiled tier (`Profile.calibration`). What the kernels that run read is told by
  the CallSpec: the cache slots a decode step reads (`decode_kv_slots`) and whether full-sequence
  attention is fused (`fused_attention`). Used for layouts beyond the machine, and by the planners.

Seconds from counts: `overhead + max(flops / matmul_flops, bytes / hbm_bandwidth) + intra-host comm /
intra_mesh_collective_bandwidth + inter-host comm / inter_host_bandwidth` (+ a per-layer step overhead for
each decode step) + collectives x `collective_latency_s` (executed collectives, counted per call: HLO
executions in the compiled tier, per layer / micro-batch / decode step in the analytic one; a wall-clock
cost kept outside the fitted factors). `python -m search.profile --calibrate` (`search.calibrate`) fits, per call kind, how
these terms add up on the machine: `time` x (overhead + flops time + bytes_time x HBM time + comm_time x
gather/scatter comm time + reduce_time x all-reduce comm time + steps), with `call_overhead_s`,
`bytes_time`, `comm_time`, `reduce_time`, `time` per kind and `step_overhead_s` (`CallCost.parts`).

Communication comes in two classes with separate factors, because they behave differently on the
machine: all-reduces (tensor parallelism's activation all-reduces, the data-parallel gradient
all-reduce) sit on the critical path, while FSDP's weight all-gathers and gradient reduce-scatters can
run behind the layer before them. One factor for both, fitted to FSDP cases only, put tensor=4
inference on 4x H200 at 1.8x its measured time and 7B train steps at fsdp=2 or tensor=2 at 0.7-0.8x
(bench/README.md, third 4-GPU session).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable
from typing import Any

from search import hlo
from search.profile import Profile
from sharding import Layout

KINDS = ("generate", "inference", "train_step")


@dataclasses.dataclass(frozen=True)
class ModelShape:
  """The numbers of a decoder the estimator needs (no framework objects)."""

  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  vocab_size: int
  params: int
  compute_bytes: int = 2   # bf16 activations / compute copy of the weights
  param_bytes: int = 4     # stored parameters (fp32 masters)
  remat: str = "none"

  def dense_flops_per_token(self, head: str = "lm") -> float:
    """Matmul flops per token of a forward: the layers' projections and the head ([D, V] for "lm",
    [D] for "scalar")."""
    d, f, n, k, h, l = self.d_model, self.d_ff, self.n_heads, self.n_kv_heads, self.head_dim, self.n_layers
    v = self.vocab_size if head == "lm" else 1
    return 2.0 * (l * (2 * d * n * h + 2 * d * k * h + 3 * d * f) + d * v)

  def n_leaves(self) -> int:
    return 9 * self.n_layers + 3


@dataclasses.dataclass(frozen=True)
class CallSpec:
  """What the search knows of one call: its numbers, and optionally how to lower it.

  kind: "generate", "inference" or "train_step". batch: rows. prompt_len / new_tokens: generation's
  prompt bucket and budget; seq_len: the rows' total length (inference, train). trained: the model has
  optimizer state (trained models). repeats: how many times the call runs per iteration
  (e.g. PPO epochs x mini-batches train steps; counts are per run). head: "lm" or "scalar" (logits cost). key: extra text that makes
  the cache key unique (e.g. sampling settings). lower(layout) -> {"main": Lowered, ...}: see module
  docstring; None means analytic only.
  decode_kv_slots: mean KV-cache slots one decode step reads per row, as the decode loop that runs
    reads them (a loop reading the whole pre-allocated cache every step reads prompt_len + new_tokens - 1;
    one reading a growing prefix fewer); 0: prompt_len + new_tokens / 2, the mean filled length.
  fused_attention: full-sequence attention runs as a fused kernel (cuDNN flash attention: the [T, S]
    scores never reach HBM); False: the scores are materialised in float32 (XLA's path), which the
    analytic tier prices as HBM traffic.
  """

  name: str
  model: str
  kind: str
  batch: int
  shape: ModelShape
  seq_len: int = 0
  prompt_len: int = 0
  new_tokens: int = 0
  trained: bool = False
  head: str = "lm"
  repeats: int = 1
  key: str = ""
  decode_kv_slots: float = 0.0
  fused_attention: bool = True
  lower: Callable[[Layout], dict[str, Any]] | None = dataclasses.field(default=None, compare=False, hash=False)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"call {self.name!r}: kind {self.kind!r} must be one of {KINDS}")
    if self.kind == "generate" and (self.prompt_len < 1 or self.new_tokens < 1):
      raise ValueError(f"call {self.name!r}: generation needs prompt_len and new_tokens >= 1")
    if self.kind != "generate" and self.seq_len < 1:
      raise ValueError(f"call {self.name!r}: {self.kind} needs seq_len >= 1")
    if self.decode_kv_slots < 0:
      raise ValueError(f"call {self.name!r}: decode_kv_slots must be >= 0 (0: the default), got {self.decode_kv_slots}")

  @property
  def length(self) -> int:
    return self.prompt_len + self.new_tokens if self.kind == "generate" else self.seq_len

  def cache_key(self) -> str:
    d = dataclasses.asdict(self)
    d.pop("lower")
    d.pop("name")
    return json.dumps(d, sort_keys=True)


@dataclasses.dataclass(frozen=True)
class CallCost:
  """Per-device counts of one call (whole call, loops multiplied out) and where they came from."""

  flops: float
  hbm_bytes: float
  comm_intra: float       # wire bytes per device inside a host
  comm_inter: float       # wire bytes per device across hosts
  arg_bytes: float        # parameters (+ optimizer state) of the call's layout, per device
  temp_bytes: float       # peak activations / KV cache / gathered weights beyond the arguments
  tier: str = "analytic"
  steps: int = 0          # decode steps (for the per-step overhead)
  kind: str = ""          # the call kind, for its calibration (see `parts`)
  colls_intra: float = 0.0  # collectives executed per call inside a host (for the per-collective latency)
  colls_inter: float = 0.0  # collectives executed per call across hosts
  comm_reduce: float = 0.0  # the all-reduce part of comm_intra + comm_inter (wire bytes per device)
  comm_reduce_inter: float = 0.0  # the part of comm_reduce that crosses hosts (within comm_inter)
  comm_tensor: float = 0.0  # analytic tier: the tensor-parallel all-reduce part of comm_reduce (see split_comm)
  colls_tensor: float = 0.0  # analytic tier: the tensor-parallel collectives among colls_intra + colls_inter

  def parts(self, profile: Profile, n_layers: int = 0) -> dict[str, float]:
    """The seconds before the kind's `time` factor, by term: overhead, compute, comm and steps.

    overhead: the kind's fitted `call_overhead_s`, else the profile's; compute: max(flops time, HBM
    time), or, once the kind has a fitted `bytes_time`, flops time + bytes_time x HBM time (matmuls
    and memory-bound kernels do not overlap); comm: link seconds, the all-reduce share (`comm_reduce`)
    times the kind's `reduce_time` and the rest times its `comm_time` (the exposed shares, fitted;
    1 where not fitted: all of the link time); steps: decode steps x layers x `step_overhead_s`; latency: executed
    collectives x the profile's `collective_latency_s` (intra / inter host), a measured wall-clock cost, so
    divided here by the kind's `time` factor that the callers multiply every part by (it adds exactly
    count x latency to the call's seconds, not scaled by `time` or `comm_time`).
    """
    cal = profile.calibration.get(self.kind, {})
    flops_s, bytes_s = self.flops / profile.matmul_flops, self.hbm_bytes / profile.hbm_bandwidth
    compute = flops_s + float(cal["bytes_time"]) * bytes_s if "bytes_time" in cal else max(flops_s, bytes_s)
    gather_s, reduce_s = self.link_seconds(profile)
    comm = gather_s * float(cal.get("comm_time", 1.0)) + reduce_s * float(cal.get("reduce_time", 1.0))
    time = float(cal.get("time", 1.0)) or 1.0
    return {"overhead": float(cal.get("call_overhead_s", profile.call_overhead_s)), "compute": compute,
            "comm": comm, "steps": self.steps * n_layers * profile.step_overhead_s,
            "latency": self.latency_s(profile) / time}

  def link_seconds(self, profile: Profile) -> tuple[float, float]:
    """(gather / scatter, all-reduce) seconds on the links at the profile's bandwidths, each class's
    bytes priced on its own link (inside a host or across hosts)."""
    r_inter = min(max(self.comm_reduce_inter, 0.0), self.comm_inter)
    r_intra = min(max(self.comm_reduce - r_inter, 0.0), self.comm_intra)
    bw_in, bw_out = profile.intra_mesh_collective_bandwidth, profile.inter_host_bandwidth
    return ((self.comm_intra - r_intra) / bw_in + (self.comm_inter - r_inter) / bw_out,
            r_intra / bw_in + r_inter / bw_out)

  @property
  def reduce_share(self) -> float:
    """The all-reduce share of the wire bytes (0 when the call communicates nothing)."""
    total = self.comm_intra + self.comm_inter
    return min(1.0, max(0.0, self.comm_reduce / total)) if total > 0 else 0.0

  def latency_s(self, profile: Profile) -> float:
    """Wall-clock seconds of the per-collective latency: executed collectives x latency per link."""
    return self.colls_intra * profile.collective_latency_s + self.colls_inter * profile.inter_latency_s

  def seconds(self, profile: Profile, n_layers: int = 0) -> float:
    """One run of the call, before the kind's `time` factor (`Estimator.seconds` applies it)."""
    return sum(self.parts(profile, n_layers).values())

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


# -- compiled tier -----------------------------------------------------------------------------


def _counts(lowered, layout: Layout, devices_per_host: int) -> dict[str, float]:
  compiled = lowered.compile()
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  ma = compiled.memory_analysis()
  colls = hlo.collectives(compiled.as_text(), layout.device_mesh.size)
  intra, inter = hlo.comm_bytes(colls, devices_per_host, layout.device_mesh.start)
  n_intra, n_inter = hlo.comm_counts(colls, devices_per_host, layout.device_mesh.start)
  reduces = [c for c in colls if c.kind == "all-reduce"]
  reduce = sum(c.wire_bytes * c.count for c in reduces)
  reduce_inter = sum(c.wire_bytes * c.count for c in reduces
                     if c.spans_hosts(devices_per_host, layout.device_mesh.start))
  args = float(ma.argument_size_in_bytes)
  temp = float(ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes)
  return {"flops": float(ca.get("flops", 0.0)), "bytes": float(ca.get("bytes accessed", 0.0)), "intra": intra,
          "inter": inter, "args": args, "temp": max(temp, 0.0), "n_intra": n_intra, "n_inter": n_inter,
          "reduce": reduce, "reduce_inter": reduce_inter}


def layer_loop_correction(spec: CallSpec, layout: Layout, layer_loop: str = "scan") -> tuple[float, float]:
  """(flops, bytes) that `cost_analysis` misses because the layer stack runs as a `scan`.

  XLA counts the scanned layer body once; the missing (L - 1) layers are taken from the analytic
  tier as A(L) - A(1) (the forward/backward of the call, or generation's prefill and one decode
  step). `layer_loop="unrolled"` (a lowering whose layers are all in the HLO, such as generation with
  the layered decode loop: its prefill and decode steps loop over per-layer weights in Python) needs
  none. Collectives need no correction: the HLO walker multiplies them by the loop's known trip count.
  """
  if spec.shape.n_layers <= 1 or layer_loop == "unrolled":
    return 0.0, 0.0
  if layer_loop != "scan":
    raise ValueError(f"call {spec.name!r}: layer_loop {layer_loop!r} must be 'scan' or 'unrolled'")
  one = dataclasses.replace(spec.shape, n_layers=1)
  base = spec if spec.kind != "generate" else dataclasses.replace(spec, new_tokens=1)
  a_l = analytic_counts(base, layout)
  a_1 = analytic_counts(dataclasses.replace(base, shape=one), layout)
  return a_l.flops - a_1.flops, a_l.hbm_bytes - a_1.hbm_bytes


def logits_chunk_correction(spec: CallSpec, layout: Layout, chunks: int) -> tuple[float, float]:
  """(flops, bytes) that `cost_analysis` misses when the LM head runs over `chunks` chunks of positions
  in a `scan` (chunked log-probs): it counts one chunk's body (forward, and backward in a train step),
  so (chunks - 1) / chunks of the analytic head counts (`head_counts`) are added."""
  if chunks <= 1 or spec.head != "lm" or spec.kind == "generate":
    return 0.0, 0.0
  flops, byts = head_counts(spec, layout)
  frac = (chunks - 1) / chunks
  return frac * flops, frac * byts


def compiled_cost(spec: CallSpec, layout: Layout, devices_per_host: int) -> CallCost:
  """Compiles spec.lower(layout)'s parts and combines them (see module docstring).

  Parts: "main" (the call as it runs: its memory and collectives), optionally "flat" (the call with
  one micro-batch: its flops and bytes) and, for generation, "decode" (one decode step) with
  "decode_extra" (decode steps beyond those `main` counts; default new_tokens - 1); plain numbers
  "layer_loop" ("scan" | "unrolled", see `layer_loop_correction`) and "logits_chunks" (see
  `logits_chunk_correction`).
  """
  parts = spec.lower(layout)
  main = _counts(parts["main"], layout, devices_per_host)
  flat = _counts(parts["flat"], layout, devices_per_host) if "flat" in parts else main
  dflops, dbytes = layer_loop_correction(spec, layout, parts.get("layer_loop", "scan"))
  cflops, cbytes = logits_chunk_correction(spec, layout, int(parts.get("logits_chunks", 1)))
  flops = flat["flops"] + dflops + cflops
  hbm_bytes = flat["bytes"] + dbytes + cbytes
  intra, inter, reduce, reduce_inter = main["intra"], main["inter"], main["reduce"], main["reduce_inter"]
  n_intra, n_inter = main["n_intra"], main["n_inter"]
  steps = 0
  if spec.kind == "generate" and "decode" in parts:
    dec = _counts(parts["decode"], layout, devices_per_host)
    steps = spec.new_tokens
    extra = float(parts.get("decode_extra", steps - 1))
    flops += extra * dec["flops"]
    hbm_bytes += extra * dec["bytes"]
    intra += extra * dec["intra"]
    inter += extra * dec["inter"]
    reduce += extra * dec["reduce"]
    reduce_inter += extra * dec["reduce_inter"]
    n_intra += extra * dec["n_intra"]
    n_inter += extra * dec["n_inter"]
  return CallCost(flops, hbm_bytes, intra, inter, main["args"], main["temp"], "compiled", steps, spec.kind,
                  n_intra, n_inter, reduce, reduce_inter)


# -- analytic tier -----------------------------------------------------------------------------


def _ring(n: int) -> float:
  return (n - 1) / n if n > 1 else 0.0


def analytic_counts(spec: CallSpec, layout: Layout) -> CallCost:
  """Uncalibrated analytic counts (module docstring); `Estimator` applies the calibration."""
  m, st = spec.shape, layout.strategy
  d, f, t, k = st.data, st.fsdp, st.tensor, st.micro_batches
  n = d * f * t
  cb, pb, p = m.compute_bytes, m.param_bytes, float(m.params)
  b_loc = spec.batch / (d * f)                 # rows per device group
  t_kv = t if m.n_kv_heads % t == 0 else 1
  w_c = p * cb / t                             # compute-dtype weights one device reads after the FSDP gather
  head_width = m.vocab_size if spec.head == "lm" else 1
  args = p * pb / (f * t) + (p * 8 / (f * t) if spec.kind == "train_step" else 0.0)
  # Every call casts its stored parameters to the compute dtype once, up front (`_calls.compute_params`),
  # and XLA keeps the cast shard for the whole call: a 350M model with fp32 parameters and bf16 compute
  # has 0.62 GB more temp than with bf16 parameters (CPU memory_analysis), and a 7B reward model's
  # inference on 4x H200 asked for a single 13.15 GiB temp buffer.
  cast = p * cb / (f * t) if pb != cb else 0.0

  # Collectives per pass over the layers (one micro-batch, forward or backward, or one decode step): 2
  # tensor-parallel all-reduces per layer (attention out, MLP out) and one for the embedding lookup in
  # the vocab-split table; one FSDP all-gather (reduce-scatter for gradients) per layer plus one for
  # the embeddings / head (XLA's combiner merges a layer's leaves).
  tp_colls = 2 * m.n_layers + 1 if t > 1 else 0
  fsdp_colls = m.n_layers + 1 if f > 1 else 0
  # A decode step also draws its token: over vocab-split logits that takes all-reduces and gathers
  # (the row's max and logsumexp, the drawn token and its logit: 4 in the compiled CPU step of
  # `generation.sample_token`; 5 with the two-level draw tried in 0b4d9c2); and the loop tests whether
  # every row is done, an all-reduce when rows are split.
  draw_tp_colls = 4 if t > 1 and spec.head == "lm" else 0
  draw_colls = draw_tp_colls + (1 if d * f > 1 else 0)

  def forward(rows, length, mbs, head_positions=None):
    """(flops, bytes, intra-mesh wire bytes, their all-reduce part, temp) of a forward over rows x length
    in mbs micro-batches.

    Attention: QK^T and PV over every (query, key) pair, 4 x L x N x H flops per pair: the mask is an
    explicit array, so neither cuDNN nor XLA skips the masked half. Unfused attention also writes the
    float32 scores and reads them back (~3 passes of rows x N x T x S x 4 bytes per layer).
    head_positions: positions whose head (and logits) are computed, default all rows x length (the
    sampler's prefill projects only each row's last position: rows).
    """
    tok = rows * length
    head_tok = tok if head_positions is None else head_positions
    head_flops = 2.0 * m.d_model * head_width
    flops = (tok * (m.dense_flops_per_token(spec.head) - head_flops
                    + 4.0 * m.n_layers * m.n_heads * m.head_dim * length) + head_tok * head_flops) / n
    act = tok / (d * f) * m.d_model * cb
    byts = mbs * w_c + act * m.n_layers * 12 + head_tok / (d * f) * head_width / t * 4 * 3
    if not spec.fused_attention:
      byts += tok / (d * f) * length * m.n_heads / t * 4 * 3 * m.n_layers
    reduce = 2 * m.n_layers * 2 * _ring(t) * act
    comm = mbs * w_c * _ring(f) + reduce
    temp = (act / mbs * (8 + 3 * m.d_ff / m.d_model / t) + head_tok / (d * f) / mbs * head_width / t * 4 * 2
            + (2 * w_c / m.n_layers if f > 1 else 0.0))
    return flops, byts, comm, reduce, temp

  steps = 0
  if spec.kind == "inference":
    flops, byts, comm, reduce, temp = forward(spec.batch, spec.seq_len, k)
    temp += cast
    colls = k * (tp_colls + fsdp_colls)
    tensor_reduce, tensor_colls = reduce, k * tp_colls
  elif spec.kind == "train_step":
    ff, fb, fc, fr, ft = forward(spec.batch, spec.seq_len, k)
    mult = 4.0 if m.remat == "full" else 3.0
    # The chunked LM head's custom backward recomputes its logits: 4 passes whatever the remat.
    flops = ff * mult + (4.0 - mult) * head_counts(dataclasses.replace(spec, kind="inference"), layout)[0]
    byts = fb * 3 + p / (f * t) * (pb * 3 + 8 * 2 + 4 * 2)
    dp_reduce = 2 * _ring(d) * p * 4 / (f * t)
    comm = 2 * fc + k * p * 4 / t * _ring(f) * f / max(f, 1) + dp_reduce
    reduce = 2 * fr + dp_reduce
    act_saved = b_loc / k * spec.seq_len * m.d_model * cb * m.n_layers * (2 if m.remat == "full" else 14)
    temp = ft + act_saved + p * 4 / (f * t) + cast
    # Forward + backward: tensor all-reduces and FSDP gathers twice, gradient reduce-scatter once, per
    # micro-batch; the data-parallel gradient all-reduce once per step (per layer + embeddings / head).
    colls = k * (2 * tp_colls + 3 * fsdp_colls) + (m.n_layers + 1 if d > 1 else 0)
    tensor_reduce, tensor_colls = 2 * fr, k * 2 * tp_colls
  else:
    s = spec.prompt_len + spec.new_tokens
    pf, pbyt, pc, pr, pt = forward(spec.batch, spec.prompt_len, 1, head_positions=spec.batch)  # Last position only.
    steps = spec.new_tokens
    # Cache slots a decode step reads (and attends over) per row: as the decode loop reads them.
    s_read = spec.decode_kv_slots or spec.prompt_len + spec.new_tokens / 2
    attn = 4.0 * m.n_layers * m.n_heads * m.head_dim * s_read
    step_flops = spec.batch * (m.dense_flops_per_token(spec.head) + attn) / n
    kv_read = b_loc * s_read * m.n_layers * 2 * m.n_kv_heads * m.head_dim * cb / t_kv
    step_bytes = w_c + kv_read + b_loc * head_width / t * 4
    step_reduce = 2 * m.n_layers * 2 * _ring(t) * b_loc * m.d_model * cb
    step_comm = w_c * _ring(f) + step_reduce
    flops, byts, comm = pf + steps * step_flops, pbyt + steps * step_bytes, pc + steps * step_comm
    reduce = pr + steps * step_reduce
    kv = b_loc * s * m.n_layers * 2 * m.n_kv_heads * m.head_dim * cb / t_kv
    temp = kv + pt + cast
    colls = (1 + steps) * (tp_colls + fsdp_colls) + steps * draw_colls  # The prefill, then every decode step.
    tensor_reduce = reduce
    tensor_colls = (1 + steps) * tp_colls + steps * draw_tp_colls
  intra, inter = comm, 0.0
  return CallCost(flops, byts, intra, inter, args, temp, "analytic", steps, spec.kind, float(colls), 0.0, reduce,
                  comm_tensor=tensor_reduce, colls_tensor=float(tensor_colls))


def head_counts(spec: CallSpec, layout: Layout) -> tuple[float, float]:
  """Per-device (flops, bytes) of the LM head over the call's sequences: the [D, V] matmul and the
  float32 logits (written, read back for the log-softmax, read for the picked token); a train step
  runs it 4 times (forward, and the chunked backward's recompute, input and weight gradients) and its
  logits traffic 3 times. (0, 0) for a scalar head or generation (whose prefill projects one position)."""
  if spec.head != "lm" or spec.kind == "generate":
    return 0.0, 0.0
  m, st = spec.shape, layout.strategy
  tok = spec.batch * spec.seq_len / (st.data * st.fsdp)
  flops = tok * 2.0 * m.d_model * m.vocab_size / st.tensor
  byts = tok * m.vocab_size / st.tensor * 4 * 3
  return (4 * flops, 3 * byts) if spec.kind == "train_step" else (flops, byts)


def split_comm(cost: CallCost, layout: Layout, devices_per_host: int) -> CallCost:
  """The analytic tier's traffic on its links: all inside a host when the mesh is; on a mesh of whole
  hosts, the tensor-parallel all-reduces (`comm_tensor`, `colls_tensor`) stay inside a host when
  tensor <= devices_per_host (the mesh axes are ordered (data, fsdp, tensor), so a tensor group is
  tensor consecutive devices of one host), and everything else, the FSDP gathers and scatters and the
  data-parallel gradient all-reduce, crosses hosts (an fsdp or data group then spans hosts)."""
  if layout.device_mesh.size <= devices_per_host:
    return cost
  total, colls = cost.comm_intra + cost.comm_inter, cost.colls_intra + cost.colls_inter
  local = layout.strategy.tensor <= devices_per_host
  t_bytes, t_colls = (cost.comm_tensor, cost.colls_tensor) if local else (0.0, 0.0)
  return dataclasses.replace(cost, comm_intra=t_bytes, comm_inter=total - t_bytes,
                             comm_reduce_inter=cost.comm_reduce - t_bytes,
                             colls_intra=t_colls, colls_inter=colls - t_colls)


# -- estimator ---------------------------------------------------------------------------------


def _default_cache_dir() -> str:
  return os.path.join(os.path.expanduser("~"), ".cache", "real_jax", "estimates")


class Estimator:
  """Costs and seconds per (call, layout), compiled where possible, cached in memory and on disk.

  mode: "auto" (compiled where the call can be lowered and the layout fits `jax.device_count()`,
  analytic otherwise), "compiled" or "analytic".
  """

  def __init__(self, profile: Profile, *, cache_dir: str | None = None, mode: str = "auto"):
    if mode not in ("auto", "compiled", "analytic"):
      raise ValueError(f"Estimator mode={mode!r}: expected auto, compiled or analytic")
    self.profile = profile
    self.mode = mode
    self.cache_dir = _default_cache_dir() if cache_dir is None else cache_dir
    self._mem: dict[tuple, CallCost] = {}
    self.compiles = 0
    self.disk_hits = 0

  def _path(self, spec: CallSpec, layout: Layout, tier: str) -> str:
    import jax
    # "layered-reduce": entries written before the layered decode step was lowered (or before CallCost
    # counted collectives, or their all-reduce share) are not reused.
    text = json.dumps([tier, "layered-reduce", spec.cache_key(), layout.device_mesh.start, layout.device_mesh.size,
                       str(layout.strategy), layout.rules, jax.__version__, self.profile.devices_per_host])
    return os.path.join(self.cache_dir, hashlib.sha256(text.encode()).hexdigest()[:32] + ".json")

  def _can_compile(self, spec: CallSpec, layout: Layout) -> bool:
    if spec.lower is None or self.mode == "analytic":
      return False
    import jax
    return layout.device_mesh.stop <= jax.device_count()

  def compiled(self, spec: CallSpec, layout: Layout) -> CallCost:
    key = ("compiled", spec.cache_key(), layout)
    if key in self._mem:
      return self._mem[key]
    path = self._path(spec, layout, "compiled") if self.cache_dir else ""
    if path and os.path.exists(path):
      with open(path) as f:
        cost = dataclasses.replace(CallCost(**json.load(f)), kind=spec.kind)  # Older entries lack kind.
      self.disk_hits += 1
    else:
      cost = compiled_cost(spec, layout, self.profile.devices_per_host)
      self.compiles += 1
      if path:
        os.makedirs(self.cache_dir, exist_ok=True)
        tmp = path + f".tmp{os.getpid()}"
        with open(tmp, "w") as f:
          json.dump(cost.to_dict(), f)
        os.replace(tmp, path)
    self._mem[key] = cost
    return cost

  def analytic(self, spec: CallSpec, layout: Layout, *, calibrated: bool = True) -> CallCost:
    c = analytic_counts(spec, layout)
    if calibrated:
      fk = lambda w: self.profile.factor(spec.kind, w)  # noqa: E731
      c = dataclasses.replace(c, flops=c.flops * fk("flops"), hbm_bytes=c.hbm_bytes * fk("bytes"),
                              comm_intra=c.comm_intra * fk("comm"), comm_inter=c.comm_inter * fk("comm"),
                              comm_reduce=c.comm_reduce * fk("comm"),
                              comm_reduce_inter=c.comm_reduce_inter * fk("comm"),
                              comm_tensor=c.comm_tensor * fk("comm"),
                              temp_bytes=c.temp_bytes * self.memory_factor(spec, layout))
    return split_comm(c, layout, self.profile.devices_per_host)

  def memory_factor(self, spec: CallSpec, layout: Layout) -> float:
    """The kind's measured `memory` factor on the analytic temp bytes; under tensor parallelism its
    `memory_tensor` factor where the profile has one. On 4x H200 (h200_4gpu) a 7B train step's
    (peak - arguments) / counted temp was 0.64-0.96 without tensor parallelism and 1.10-1.45 with it
    (and a colocated tensor=4 plan peaked 23 GiB above its prediction under one factor), so one factor
    either under-counts tensor-parallel steps or over-counts the others."""
    cal = self.profile.calibration.get(spec.kind, {})
    if layout.strategy.tensor > 1 and "memory_tensor" in cal:
      return float(cal["memory_tensor"])
    return float(cal.get("memory", 1.0))

  def cost(self, spec: CallSpec, layout: Layout) -> CallCost:
    if self.mode == "compiled" or (self.mode == "auto" and self._can_compile(spec, layout)):
      if not self._can_compile(spec, layout):
        raise ValueError(f"call {spec.name!r}: cannot compile under {layout} (no lower() or too few devices)")
      return self.compiled(spec, layout)
    return self.analytic(spec, layout)

  def seconds(self, spec: CallSpec, layout: Layout) -> float:
    c = self.cost(spec, layout)
    return spec.repeats * c.seconds(self.profile, spec.shape.n_layers) * self.profile.factor(spec.kind, "time")


def fit_calibration(pairs: list[tuple[CallSpec, CallCost, CallCost]]) -> dict[str, dict[str, float]]:
  """Per-kind factors (geometric mean of compiled / analytic) from (spec, compiled, uncalibrated analytic)."""
  out: dict[str, dict[str, float]] = {}
  fields = {"flops": "flops", "bytes": "hbm_bytes", "memory": "temp_bytes"}
  for kind in KINDS:
    rows = [(c, a) for s, c, a in pairs if s.kind == kind]
    if not rows:
      continue
    out[kind] = {}
    for name, attr in fields.items():
      r = [getattr(c, attr) / getattr(a, attr) for c, a in rows if getattr(a, attr) > 0 and getattr(c, attr) > 0]
      out[kind][name] = math.exp(sum(math.log(x) for x in r) / len(r)) if r else 1.0
    r = [(c.comm_intra + c.comm_inter) / (a.comm_intra + a.comm_inter) for c, a in rows
         if a.comm_intra + a.comm_inter > 0 and c.comm_intra + c.comm_inter > 0]
    out[kind]["comm"] = math.exp(sum(math.log(x) for x in r) / len(r)) if r else 1.0
  return out

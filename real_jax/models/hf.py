"""HuggingFace interop: load `config.json` + safetensors checkpoints into a Layout, export them back.

Supported architectures: LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM and their
*ForSequenceClassification variants with num_labels = 1 (the scalar head of critics and reward
models). RoPE: default or `llama3` scaling. Anything else raises a ValueError naming the key.

Tensor mapping (HF -> ours; L layers are stacked on our leading `layers` axis; HF linear weights
are [out, in]; shape letters as in `config.py`):

  model.embed_tokens.weight                 [V, D]      -> embed      [V, D]
  model.layers.{l}.input_layernorm.weight   [D]         -> layers.attn_norm [L, D]
  model.layers.{l}.self_attn.q_proj.weight  [N*H, D]    -> layers.wq  [L, D, N, H]
  model.layers.{l}.self_attn.k/v_proj.weight [K*H, D]   -> layers.wk/wv [L, D, K, H]
  model.layers.{l}.self_attn.o_proj.weight  [D, N*H]    -> layers.wo  [L, N, H, D]
  model.layers.{l}.self_attn.q/k/v_proj.bias [N*H|K*H]  -> layers.bq/bk/bv [L, N|K, H]   (Qwen2)
  model.layers.{l}.post_attention_layernorm.weight [D]  -> layers.mlp_norm [L, D]
  model.layers.{l}.mlp.gate/up_proj.weight  [F, D]      -> layers.w_gate/w_up [L, D, F]
  model.layers.{l}.mlp.down_proj.weight     [D, F]      -> layers.w_down [L, F, D]
  model.norm.weight                         [D]         -> final_norm [D]
  lm_head.weight                            [V, D]      -> lm_head    [D, V]  (absent when tied)
  score.weight                              [1, D]      -> score      [D]     (sequence classification)

Our RoPE uses HF's rotate-half convention, so q/k weights need no permutation.

Loading never materialises the model on one device: every parameter is built with
`jax.make_array_from_callback` in its target sharding, and the callback reads from the
safetensors file(s) only the slice that one device shard needs (layer by layer, transposed and
reshaped per slice). Host memory peaks at the distinct local shards of one parameter (at most one
stacked parameter, i.e. L HF tensors; far less when sharded), since make_array_from_callback
gathers a parameter's shards before the transfer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from real_jax.models.config import ModelConfig, RopeScaling
from real_jax.models.transformer import Transformer, abstract_model

_FAMILY = {"LlamaFor": "llama", "Qwen2For": "qwen2", "MistralFor": "mistral"}
_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral"}
_ARCH_PREFIX = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float32"}  # No fp16 in ModelConfig.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # Non-persistent buffers some old exports contain.
_SAFE_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}

# -------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig.


def _arch(hf: dict) -> tuple[str, str]:
  """(family, head) from `architectures`; raises ValueError naming the key."""
  archs = hf.get("architectures") or []
  if len(archs) != 1:
    raise ValueError(f"config.json 'architectures'={archs!r}: expected exactly one of "
                     f"{{Llama,Qwen2,Mistral}}For{{CausalLM,SequenceClassification}}")
  arch = archs[0]
  for prefix, family in _FAMILY.items():
    if arch == prefix + "CausalLM":
      return family, "lm"
    if arch == prefix + "SequenceClassification":
      return family, "scalar"
  raise ValueError(f"config.json 'architectures'={arch!r} is not supported; supported: "
                   f"{{Llama,Qwen2,Mistral}}For{{CausalLM,SequenceClassification}}")


def _rope(hf: dict) -> tuple[float, RopeScaling | None]:
  """(rope_theta, scaling) from either transformers 5 `rope_parameters` or legacy `rope_theta`/`rope_scaling`."""
  key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
  params = dict(hf.get(key) or {})
  if key == "rope_parameters" and any(isinstance(v, dict) for v in params.values()):
    raise ValueError(f"config.json '{key}' holds per-layer-type RoPE parameters {sorted(params)}; not supported")
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = params.get("rope_type", params.get("type", "default"))
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise ValueError(f"config.json 'partial_rotary_factor'={partial}: only 1.0 is supported")
  if rope_type == "default":
    return float(theta), None
  if rope_type != "llama3":
    raise ValueError(f"config.json '{key}.rope_type'={rope_type!r}: only 'default' and 'llama3' are supported")
  try:
    scaling = RopeScaling(
        factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings",
                                                        hf.get("max_position_embeddings"))))
  except (KeyError, TypeError) as e:
    raise ValueError(f"config.json '{key}' for rope_type 'llama3' lacks {e}") from None
  return float(theta), scaling


def _checkpoint_dtype(hf: dict) -> str:
  d = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  if d not in _DTYPES:
    raise ValueError(f"config.json 'dtype'={d!r}: expected one of {sorted(_DTYPES)}")
  return _DTYPES[d]


def config_from_hf(hf: dict) -> ModelConfig:
  """Our ModelConfig from an HF `config.json` dict. Raises ValueError naming any unsupported key.

  The parameter and compute dtype are the checkpoint's (`dtype` / `torch_dtype`; float16 becomes
  float32). Use `load_pretrained(..., dtype=...)` or `cfg.replace(...)` to change them.
  """
  family, head = _arch(hf)
  if hf.get("model_type", family) != _MODEL_TYPE[family]:
    raise ValueError(f"config.json 'model_type'={hf.get('model_type')!r} does not match "
                     f"'architectures'={hf['architectures']!r}")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json 'hidden_act'={hf['hidden_act']!r}: only 'silu' is supported")
  for key in ("mlp_bias", "attention_bias"):  # Llama's attention_bias also adds an o_proj bias.
    if hf.get(key):
      raise ValueError(f"config.json '{key}'=true is not supported (our model has biases on q/k/v only, "
                       f"and only for Qwen2)")
  if hf.get("pretraining_tp", 1) not in (None, 1):
    raise ValueError(f"config.json 'pretraining_tp'={hf['pretraining_tp']}: only 1 is supported")
  max_pos = int(hf.get("max_position_embeddings", 2048))
  window = hf.get("sliding_window")
  uses_window = family == "mistral" or (family == "qwen2" and hf.get("use_sliding_window", False))
  if uses_window and window is not None and window < max_pos:
    raise ValueError(f"config.json 'sliding_window'={window} < 'max_position_embeddings'={max_pos}: "
                     f"sliding-window attention is not supported")
  layer_types = hf.get("layer_types") or []
  if any(t != "full_attention" for t in layer_types) and not (family == "qwen2" and not uses_window):
    raise ValueError(f"config.json 'layer_types'={layer_types!r}: only 'full_attention' is supported")
  if head == "scalar":
    n_labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
    if n_labels != 1:
      raise ValueError(f"config.json 'id2label'/'num_labels' gives {n_labels} labels: the scalar head needs 1")
  theta, scaling = _rope(hf)
  try:
    n_heads = int(hf["num_attention_heads"])
    d_model = int(hf["hidden_size"])
    dtype = _checkpoint_dtype(hf)
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]), d_model=d_model, n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads, n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or d_model // n_heads), d_ff=int(hf["intermediate_size"]),
        rms_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        qkv_bias=family == "qwen2", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=max_pos, family=family, dtype=dtype, param_dtype=dtype)
  except KeyError as e:
    raise ValueError(f"config.json lacks required key {e}") from None


def head_from_hf(hf: dict) -> str:
  """"lm" for *ForCausalLM, "scalar" for *ForSequenceClassification."""
  return _arch(hf)[1]


def config_to_hf(cfg: ModelConfig, *, head: str = "lm", dtype: str | None = None) -> dict:
  """The HF `config.json` dict for `cfg` (legacy `rope_theta`/`rope_scaling` keys, which transformers
  4.x reads and 5.x converts to `rope_parameters`)."""
  if head not in ("lm", "scalar"):
    raise ValueError(f"head={head!r}: expected 'lm' or 'scalar'")
  if cfg.qkv_bias != (cfg.family == "qwen2"):
    raise ValueError(f"ModelConfig.qkv_bias={cfg.qkv_bias} cannot be expressed as an HF {cfg.family!r} config "
                     f"(only Qwen2 has q/k/v biases)")
  dtype = dtype or cfg.param_dtype
  arch = _ARCH_PREFIX[cfg.family] + ("ForCausalLM" if head == "lm" else "ForSequenceClassification")
  hf: dict[str, Any] = {
      "architectures": [arch], "model_type": _MODEL_TYPE[cfg.family], "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
      "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.rms_eps,
      "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
      "dtype": dtype, "torch_dtype": dtype,
  }
  if cfg.rope_scaling is not None:
    sc = cfg.rope_scaling
    hf["rope_scaling"] = {"rope_type": "llama3", "factor": sc.factor, "low_freq_factor": sc.low_freq_factor,
                          "high_freq_factor": sc.high_freq_factor,
                          "original_max_position_embeddings": sc.original_max_position_embeddings}
  if cfg.family == "llama":
    hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
  elif cfg.family == "mistral":
    hf["sliding_window"] = None
  else:
    hf.update(use_sliding_window=False, sliding_window=None)
  if head == "scalar":
    hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
  return hf


# -------------------------------------------------------------------------------------------------
# The tensor map.


@dataclasses.dataclass(frozen=True)
class _Map:
  """Where one of our parameters lives in an HF checkpoint.

  `hf` is the tensor name (with `{l}` for layer-stacked parameters). `dims[j]` lists the sizes of
  the "view" axes that HF dimension j holds (row-major; () for a size-1 dimension); view axes are
  numbered in order across all HF dimensions. Our (per-layer) array is the view transposed by `perm`.
  """

  hf: str
  dims: tuple[tuple[int, ...], ...]
  perm: tuple[int, ...]

  @property
  def stacked(self) -> bool:
    return "{l}" in self.hf

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return tuple(math.prod(g) for g in self.dims)

  @property
  def view_shape(self) -> tuple[int, ...]:
    return tuple(s for g in self.dims for s in g)

  @property
  def our_shape(self) -> tuple[int, ...]:
    return tuple(self.view_shape[p] for p in self.perm)

  def read(self, tensor, ranges: list[tuple[int, int]]) -> np.ndarray:
    """Our array restricted to `ranges` (one (start, stop) per our per-layer axis), read from the HF
    tensor slice object `tensor`: only the rows of each HF dimension the slice needs are read."""
    vr = [None] * len(ranges)
    for i, p in enumerate(self.perm):
      vr[p] = ranges[i]
    view = self.view_shape
    hf_index, local_shape, local_index, a = [], [], [], 0
    for g in self.dims:
      if not g:  # A size-1 HF dimension holding no axis of ours.
        hf_index.append(slice(0, 1))
        continue
      inner = math.prod(g[1:])
      (start, stop) = vr[a]
      hf_index.append(slice(start * inner, stop * inner))
      local_shape.append(stop - start)
      local_index.append(slice(None))
      for k in range(1, len(g)):  # Inner axes of a merged dimension: read whole, slice locally.
        local_shape.append(view[a + k])
        local_index.append(slice(*vr[a + k]))
      a += len(g)
    x = np.asarray(tensor[tuple(hf_index)]).reshape(local_shape)[tuple(local_index)]
    return np.transpose(x, self.perm)

  def write(self, ours: np.ndarray) -> np.ndarray:
    """The HF tensor from one (per-layer) array of ours."""
    return np.transpose(ours, np.argsort(self.perm)).reshape(self.hf_shape)


def _tensor_map(cfg: ModelConfig, head: str) -> dict[str, _Map]:
  """Our state path ("layers/wq") -> its HF tensor."""
  d, n, k, h, f, v = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  pre = "model.layers.{l}."
  m = {
      "embed": _Map("model.embed_tokens.weight", ((v,), (d,)), (0, 1)),
      "layers/attn_norm": _Map(pre + "input_layernorm.weight", ((d,),), (0,)),
      "layers/wq": _Map(pre + "self_attn.q_proj.weight", ((n, h), (d,)), (2, 0, 1)),
      "layers/wk": _Map(pre + "self_attn.k_proj.weight", ((k, h), (d,)), (2, 0, 1)),
      "layers/wv": _Map(pre + "self_attn.v_proj.weight", ((k, h), (d,)), (2, 0, 1)),
      "layers/wo": _Map(pre + "self_attn.o_proj.weight", ((d,), (n, h)), (1, 2, 0)),
      "layers/mlp_norm": _Map(pre + "post_attention_layernorm.weight", ((d,),), (0,)),
      "layers/w_gate": _Map(pre + "mlp.gate_proj.weight", ((f,), (d,)), (1, 0)),
      "layers/w_up": _Map(pre + "mlp.up_proj.weight", ((f,), (d,)), (1, 0)),
      "layers/w_down": _Map(pre + "mlp.down_proj.weight", ((d,), (f,)), (1, 0)),
      "final_norm": _Map("model.norm.weight", ((d,),), (0,)),
  }
  if cfg.qkv_bias:
    m["layers/bq"] = _Map(pre + "self_attn.q_proj.bias", ((n, h),), (0, 1))
    m["layers/bk"] = _Map(pre + "self_attn.k_proj.bias", ((k, h),), (0, 1))
    m["layers/bv"] = _Map(pre + "self_attn.v_proj.bias", ((k, h),), (0, 1))
  if head == "lm" and not cfg.tie_embeddings:
    m["lm_head"] = _Map("lm_head.weight", ((v,), (d,)), (1, 0))
  if head == "scalar":
    m["score"] = _Map("score.weight", ((), (d,)), (0,))
  return m


def _hf_names(mp: _Map, n_layers: int) -> list[str]:
  return [mp.hf.format(l=i) for i in range(n_layers)] if mp.stacked else [mp.hf]


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


# -------------------------------------------------------------------------------------------------
# Loading.


class _Checkpoint:
  """Lazy, read-only access to the tensors of a (possibly sharded) safetensors checkpoint."""

  def __init__(self, path: pathlib.Path):
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.exists():
      weight_map = json.loads(index.read_text())["weight_map"]
      files = sorted(set(weight_map.values()))
    elif single.exists():
      files, weight_map = ["model.safetensors"], None
    else:
      raise ValueError(f"{path} has neither model.safetensors nor model.safetensors.index.json "
                       f"(only safetensors checkpoints are read; nothing is unpickled)")
    self._handles = {name: safe_open(str(path / name), framework="np") for name in files}
    if weight_map is None:
      weight_map = {k: "model.safetensors" for k in self._handles["model.safetensors"].keys()}
    for name, file in weight_map.items():
      if name not in self._handles[file].keys():
        raise ValueError(f"index maps tensor {name!r} to {file}, which does not contain it")
    self.weight_map = weight_map

  def names(self) -> set[str]:
    return set(self.weight_map)

  def slice(self, name: str):
    return self._handles[self.weight_map[name]].get_slice(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.slice(name).get_shape())


def _validate(ckpt: _Checkpoint, maps: dict[str, _Map], n_layers: int, skip: set[str]) -> None:
  """Raises ValueError naming any missing, unexpected or misshapen tensor (before anything is built)."""
  expected = {name: mp.hf_shape for mp in maps.values() for name in _hf_names(mp, n_layers)}
  present = {n for n in ckpt.names() if not n.endswith(_IGNORED_SUFFIXES)} - skip
  missing = sorted(set(expected) - present)
  if missing:
    raise ValueError(f"checkpoint is missing tensor(s) {missing}")
  extra = sorted(present - set(expected))
  if extra:
    raise ValueError(f"checkpoint has unexpected tensor(s) {extra} for this config (e.g. lm_head.weight with "
                     f"tie_word_embeddings=true)")
  for name, shape in expected.items():
    got = ckpt.shape(name)
    if got != shape:
      raise ValueError(f"tensor {name!r} has shape {list(got)}, config.json implies {list(shape)}")


def _ranges(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[tuple[int, int]]:
  out = []
  for s, n in zip(index, shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f"strided shard index {s} is not supported")
    out.append((start, stop))
  return out


def _build(ckpt: _Checkpoint, mp: _Map, shape, dtype, sharding, n_layers: int) -> jax.Array:
  """One parameter of ours, created shard by shard in `sharding` from the checkpoint."""
  if tuple(shape) != ((n_layers,) if mp.stacked else ()) + mp.our_shape:
    raise ValueError(f"{mp.hf}: our parameter has shape {tuple(shape)}, expected "
                     f"{((n_layers,) if mp.stacked else ()) + mp.our_shape}")
  cache: dict[tuple, np.ndarray] = {}  # Replicas of one shard share one host buffer.

  def cb(index):
    rs = _ranges(tuple(index) + (slice(None),) * (len(shape) - len(index)), tuple(shape))
    key = tuple(rs)
    if key not in cache:
      if mp.stacked:
        (l0, l1), rest = rs[0], rs[1:]
        cache[key] = np.stack([mp.read(ckpt.slice(mp.hf.format(l=i)), rest).astype(dtype)
                               for i in range(l0, l1)])
      else:
        cache[key] = mp.read(ckpt.slice(mp.hf), rs).astype(dtype)
    return cache[key]

  return jax.make_array_from_callback(tuple(shape), sharding, cb)


def load_pretrained(path: str | os.PathLike, *, layout=None, dtype: str | None = None, head: str | None = None,
                    overrides: dict | None = None) -> Transformer:
  """Our Transformer from an HF directory (`config.json` + `model.safetensors[.index.json]`).

  layout: a `sharding.Layout`; every parameter is created directly in its sharding (None: device 0).
  dtype: parameter and compute dtype ("float32" or "bfloat16"; default: the checkpoint's).
  head: "lm" or "scalar"; default from `architectures` (*ForSequenceClassification -> "scalar").
    head="scalar" from a causal-LM checkpoint (a critic initialised from a policy) ignores
    lm_head.weight and starts the score vector at zero.
  overrides: further ModelConfig fields (e.g. {"remat": "full", "max_seq_len": 4096}).
  Raises ValueError naming the key or tensor at fault; nothing is half-loaded.
  """
  from sharding import Layout, shardings_for

  path = pathlib.Path(path)
  hf = json.loads((path / "config.json").read_text())
  cfg = config_from_hf(hf)
  ckpt_head = head_from_hf(hf)
  head = head or ckpt_head
  if head == "lm" and ckpt_head == "scalar":
    raise ValueError(f"head='lm' but {path} is a {hf['architectures'][0]} checkpoint without an LM head")
  if dtype is not None:
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
  if overrides:
    cfg = cfg.replace(**overrides)
  layout = layout if layout is not None else Layout.on(0)

  maps = _tensor_map(cfg, head)
  zero_score = head == "scalar" and ckpt_head == "lm"
  skip = set()
  if zero_score:
    maps.pop("score")
    skip = {"lm_head.weight"}
  ckpt = _Checkpoint(path)
  _validate(ckpt, maps, cfg.n_layers, skip)

  graphdef, abstract = nnx.split(abstract_model(cfg, head=head))
  shardings = shardings_for(abstract, layout)
  built: list[jax.Array] = []

  def one(p, var, sharding):
    name = _path_str(p)
    value = var.get_value()
    if name == "score" and zero_score:
      arr = jax.jit(lambda: jnp.zeros(value.shape, value.dtype), out_shardings=sharding)()
    elif name not in maps:
      raise ValueError(f"no HF tensor is known for our parameter {name!r}")
    else:
      arr = _build(ckpt, maps[name], value.shape, np.dtype(value.dtype), sharding, cfg.n_layers)
    built.append(arr)
    return var.replace(arr)

  try:
    state = jax.tree_util.tree_map_with_path(one, abstract, shardings,
                                             is_leaf=lambda x: isinstance(x, nnx.Variable))
  except BaseException:
    for arr in built:
      arr.delete()
    raise
  return nnx.merge(graphdef, state)


# -------------------------------------------------------------------------------------------------
# Export.


def _to_host(x: jax.Array) -> np.ndarray:
  """The whole array on the host. Single process: np.asarray. Multi-host: process_allgather, which
  every process must call in the same order (save_pretrained does), and only process 0 writes."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _hf_tensors(model: Transformer, dtype) -> Iterator[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
  """(HF name, HF shape, producer) for every HF tensor, one layer at a time, in a fixed order."""
  cfg = model.cfg
  maps = _tensor_map(cfg, model.head)
  leaves = {}
  jax.tree_util.tree_map_with_path(lambda p, v: leaves.__setitem__(_path_str(p), v.get_value()), nnx.state(model),
                                   is_leaf=lambda x: isinstance(x, nnx.Variable))
  if set(leaves) != set(maps):
    raise ValueError(f"model parameters {sorted(leaves)} do not match the HF tensor map {sorted(maps)}")
  for name, mp in maps.items():
    arr = leaves[name]
    for i, hf_name in enumerate(_hf_names(mp, cfg.n_layers)):
      def produce(arr=arr, i=i, mp=mp):
        x = arr[i] if mp.stacked else arr
        return mp.write(_to_host(x.astype(dtype)))
      yield hf_name, mp.hf_shape, produce


def _write_safetensors(file: pathlib.Path, entries, dtype_name: str, write: bool) -> None:
  """Streams tensors into one safetensors file: header first, then each tensor as it is produced, so
  only one tensor is on the host at a time."""
  itemsize = jnp.dtype(dtype_name).itemsize
  header, offset = {}, 0
  for name, shape, _ in entries:
    n = math.prod(shape) * itemsize
    header[name] = {"dtype": _SAFE_DTYPES[dtype_name], "shape": list(shape), "data_offsets": [offset, offset + n]}
    offset += n
  header["__metadata__"] = {"format": "pt"}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  f = open(file, "wb") if write else None
  try:
    if f:
      f.write(len(blob).to_bytes(8, "little"))
      f.write(blob)
    for name, shape, produce in entries:
      x = np.ascontiguousarray(produce())  # Every process gathers; only the writer keeps the bytes.
      if x.shape != tuple(shape):
        raise ValueError(f"export of {name}: produced shape {x.shape}, expected {shape}")
      if f:
        f.write(x.tobytes())  # Little-endian hosts only (every JAX platform).
      del x
  finally:
    if f:
      f.close()


def save_pretrained(model: Transformer, path: str | os.PathLike, *, dtype: str | None = None,
                    max_shard_size: int = 5 * 1024**3, extra_config: dict | None = None) -> None:
  """Writes `config.json` and `model.safetensors` (or `model-0000i-of-0000n.safetensors` files plus
  `model.safetensors.index.json` when larger than `max_shard_size` bytes) that
  `transformers.AutoModelForCausalLM` (or AutoModelForSequenceClassification for a scalar head) loads
  with the same outputs.

  Tensors are gathered to the host one layer at a time. Multi-host: every process must call this
  (the gathers use `multihost_utils.process_allgather`, a collective); only process 0 writes files.
  dtype: "float32" or "bfloat16" (default: the model's parameter dtype).
  extra_config: further config.json keys that ModelConfig does not hold, typically the tokenizer's
    {"pad_token_id": ..., "bos_token_id": ..., "eos_token_id": ...}. transformers' *ForSequenceClassification
    needs pad_token_id for batches > 1 (it pools the rightmost non-pad token). Keys that the
    architecture determines may not be overridden.
  """
  cfg = model.cfg
  dtype = dtype or cfg.param_dtype
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype={dtype!r}: expected 'float32' or 'bfloat16'")
  hf = config_to_hf(cfg, head=model.head, dtype=dtype)
  clash = sorted(set(extra_config or {}) & set(hf))
  if clash:
    raise ValueError(f"extra_config keys {clash} are set by the model config and may not be overridden")
  hf.update(extra_config or {})
  path = pathlib.Path(path)
  write = jax.process_index() == 0
  if write:
    path.mkdir(parents=True, exist_ok=True)
  entries = list(_hf_tensors(model, jnp.dtype(dtype)))
  itemsize = jnp.dtype(dtype).itemsize
  shards: list[list] = [[]]
  size = 0
  for e in entries:
    n = math.prod(e[1]) * itemsize
    if shards[-1] and size + n > max_shard_size:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += n
  if len(shards) == 1:
    names = ["model.safetensors"]
  else:
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for name, shard in zip(names, shards):
    _write_safetensors(path / name, shard, dtype, write)
  if not write:
    return
  if len(shards) > 1:
    total = sum(math.prod(e[1]) * itemsize for e in entries)
    index = {"metadata": {"total_size": total},
             "weight_map": {e[0]: name for name, shard in zip(names, shards) for e in shard}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
  elif (path / "model.safetensors.index.json").exists():
    (path / "model.safetensors.index.json").unlink()  # A stale index would shadow the single file.
  (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")

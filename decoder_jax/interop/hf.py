"""Hugging Face checkpoints (config.json + safetensors) to and from our params.

Families: `gpt2`, and `llama` / `mistral` / `qwen2` (SmolLM2 is a llama). Import reads one
checkpoint tensor at a time and places it straight into its shards, so host memory holds
about one tensor beyond what is already on the devices. Export writes shards of at most
`max_shard_bytes`, holding one shard on the host at a time.

Layouts. torch `nn.Linear` weights are [out, in]; ours are [*in, *out] with attention
kernels split per head: query [width, heads, head_dim], key/value [width, kv_heads,
head_dim], out [heads, head_dim, width]. GPT-2's `Conv1D` weights are already [in, out],
and its `c_attn` holds query, key and value side by side on the last axis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from decoder_jax import progress
from decoder_jax.errors import ConfigError, NotFound
from decoder_jax.model.config import ModelConfig
from decoder_jax.model.transformer import Decoder
from decoder_jax import sharding as sharding_lib

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Checkpoint entries that are buffers, not parameters: GPT-2's causal-mask tensors and the
# rotary inverse frequencies some older Llama checkpoints saved.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
# safetensors dtypes that its numpy reader cannot return (numpy has no such type).
_NON_NUMPY_DTYPES = ("BF16", "F8_E4M3", "F8_E5M2")
_DTYPES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------- configs


def _require(condition: bool, model_type: str, what: str) -> None:
  if not condition:
    raise ConfigError(f"{model_type} checkpoint: {what} is not supported by decoder_jax")


def _hf_dtype(hf: Mapping[str, Any]) -> str:
  name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  name = str(name).removeprefix("torch.")
  if name not in _DTYPES:
    raise ConfigError(f"checkpoint dtype {name!r} is not supported; supported: {_DTYPES}")
  return name


def _rope_theta(hf: Mapping[str, Any], model_type: str) -> float:
  """rope_theta from either the transformers v5 `rope_parameters` or the v4 top level."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  for source in (params, scaling):
    rope_type = source.get("rope_type", source.get("type", "default"))
    _require(rope_type == "default", model_type,
             f"rope scaling {rope_type!r} (only plain RoPE, rope_type 'default')")
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _gpt2_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  _require(hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
           "gpt2", f"activation_function {hf.get('activation_function')!r} (only the tanh "
           "GELU: gelu_new / gelu_pytorch_tanh)")
  _require(hf.get("scale_attn_weights", True), "gpt2", "scale_attn_weights=False")
  _require(not hf.get("scale_attn_by_inverse_layer_idx", False), "gpt2",
           "scale_attn_by_inverse_layer_idx=True")
  _require(not hf.get("add_cross_attention", False), "gpt2", "add_cross_attention=True")
  width = hf["n_embd"]
  return dict(family="gpt2", vocab_size=hf["vocab_size"], num_layers=hf["n_layer"],
              num_heads=hf["n_head"], width=width, mlp_width=hf.get("n_inner") or 4 * width,
              max_length=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
              use_bias=True, tie_embeddings=hf.get("tie_word_embeddings", True))


def _llama_like_config(hf: Mapping[str, Any], model_type: str) -> dict[str, Any]:
  _require(hf.get("hidden_act", "silu") == "silu", model_type,
           f"hidden_act {hf.get('hidden_act')!r} (only silu)")
  width, heads = hf["hidden_size"], hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or width // heads
  _require(head_dim * heads == width, model_type,
           f"head_dim {head_dim} with hidden_size {width} and {heads} heads (head_dim must "
           "be hidden_size / num_attention_heads)")
  max_length = hf["max_position_embeddings"]
  if model_type == "mistral":
    window = hf.get("sliding_window")
    _require(window is None or window >= max_length, model_type,
             f"sliding_window {window} shorter than max_position_embeddings {max_length}")
  if model_type == "qwen2":
    _require(not hf.get("use_sliding_window", False), model_type, "use_sliding_window=True")
    _require(all(t == "full_attention" for t in hf.get("layer_types") or ()), model_type,
             f"layer_types {hf.get('layer_types')} (only full_attention)")
  fields = dict(family="llama", vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"],
                num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
                width=width, mlp_width=hf["intermediate_size"], max_length=max_length,
                norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=_rope_theta(hf, model_type),
                tie_embeddings=hf.get("tie_word_embeddings", False))
  if model_type == "qwen2":  # biases on q/k/v only
    return dict(fields, use_bias=False, qkv_bias=True, mlp_bias=False)
  # Llama's attention_bias covers q, k, v and o; mistral has neither.
  return dict(fields, use_bias=bool(hf.get("attention_bias", False)),
              mlp_bias=bool(hf.get("mlp_bias", False)))


def config_from_hf(hf_config: Mapping[str, Any], dtype: str | None = None,
                   **overrides) -> ModelConfig:
  """A ModelConfig for a Hugging Face `config.json` dict.

  `dtype` (default: the checkpoint's) sets both the parameter and compute dtypes;
  `overrides` set any other ModelConfig field (scan_layers, attention_impl, dropout, ...).
  Raises ValueError for model types and features this codebase does not implement.
  """
  model_type = hf_config.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ConfigError(f"unsupported Hugging Face model_type {model_type!r}; "
                      f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
  _require("quantization_config" not in hf_config, model_type, "a quantized checkpoint")
  if model_type == "gpt2":
    fields = _gpt2_config(hf_config)
  else:
    fields = _llama_like_config(hf_config, model_type)
  dtype = dtype or _hf_dtype(hf_config)
  if dtype not in _DTYPES:
    raise ConfigError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
  fields.update(dtype=dtype, param_dtype=dtype, dropout=0.0)
  return ModelConfig.from_dict({**fields, **overrides})


def export_model_type(config: ModelConfig) -> str:
  """The Hugging Face model_type an export of `config` is written as."""
  if config.family == "gpt2":
    return "gpt2"
  if config.has_qkv_bias and not config.use_bias and not config.has_mlp_bias:
    return "qwen2"
  return "llama"


def _export_config(config: ModelConfig) -> ModelConfig:
  """`config` widened to the biases the exported architecture has (missing ones are zeros)."""
  if config.family == "gpt2":
    if config.kv_heads != config.num_heads:
      raise ConfigError("GPT-2 has no grouped-query attention: cannot export a gpt2-family "
                        f"model with num_kv_heads={config.kv_heads} != "
                        f"num_heads={config.num_heads}")
    return dataclasses.replace(config, use_bias=True, qkv_bias=None, mlp_bias=None)
  if export_model_type(config) == "qwen2":
    return config
  # Llama's attention_bias switches q, k, v and o together.
  attention_bias = config.use_bias or config.has_qkv_bias
  return dataclasses.replace(config, use_bias=attention_bias, qkv_bias=None,
                             mlp_bias=config.has_mlp_bias)


def config_to_hf(config: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
  """The `config.json` dict for an export of `config`."""
  model_type = export_model_type(config)
  common = dict(model_type=model_type, vocab_size=config.vocab_size,
                tie_word_embeddings=config.tie_embeddings, dtype=dtype, torch_dtype=dtype,
                bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=True)
  if model_type == "gpt2":
    return dict(common, architectures=["GPT2LMHeadModel"], n_embd=config.width,
                n_layer=config.num_layers, n_head=config.num_heads, n_inner=config.hidden_width,
                n_positions=config.max_length, layer_norm_epsilon=config.norm_eps,
                activation_function="gelu_new", resid_pdrop=config.dropout,
                embd_pdrop=config.dropout, attn_pdrop=0.0)
  fields = dict(common, hidden_size=config.width, num_hidden_layers=config.num_layers,
                num_attention_heads=config.num_heads, num_key_value_heads=config.kv_heads,
                head_dim=config.head_dim, intermediate_size=config.hidden_width,
                max_position_embeddings=config.max_length, rms_norm_eps=config.norm_eps,
                hidden_act="silu", attention_dropout=0.0, rope_theta=config.rope_theta,
                rope_parameters=dict(rope_type="default", rope_theta=config.rope_theta))
  if model_type == "qwen2":
    return dict(fields, architectures=["Qwen2ForCausalLM"], use_sliding_window=False,
                sliding_window=None, max_window_layers=config.num_layers)
  wide = _export_config(config)
  return dict(fields, architectures=["LlamaForCausalLM"], attention_bias=wide.use_bias,
              mlp_bias=wide.has_mlp_bias)


# ----------------------------------------------------------------------------- tensor map


@dataclasses.dataclass(frozen=True)
class TensorLink:
  """One of our (unscanned) parameter leaves and the checkpoint tensor it lives in."""
  ours: tuple[str, ...]  # e.g. ("block_0", "attn", "query", "kernel")
  hf: str  # e.g. "model.layers.0.self_attn.q_proj.weight"
  hf_shape: tuple[int, ...]  # the whole checkpoint tensor
  transpose: bool = False  # torch Linear weights are [out, in]; our kernels [in, out]
  part: tuple[int, int] | None = None  # [lo, hi) of the last axis of a fused tensor

  @property
  def part_shape(self) -> tuple[int, ...]:
    if self.part is None:
      return self.hf_shape
    return self.hf_shape[:-1] + (self.part[1] - self.part[0],)

  def to_ours(self, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if self.part is not None:
      tensor = tensor[..., self.part[0]:self.part[1]]
    if self.transpose:
      tensor = tensor.T
    return tensor.reshape(shape)

  def to_hf(self, leaf: np.ndarray) -> np.ndarray:
    if self.transpose:
      return leaf.reshape(self.part_shape[::-1]).T
    return leaf.reshape(self.part_shape)


def _linear(ours, hf, out_size, in_size, bias: bool) -> list[TensorLink]:
  """A torch nn.Linear: weight [out, in] (transposed into our kernel), bias [out]."""
  links = [TensorLink(ours + ("kernel",), hf + ".weight", (out_size, in_size), transpose=True)]
  if bias:
    links.append(TensorLink(ours + ("bias",), hf + ".bias", (out_size,)))
  return links


def _conv1d(ours, hf, in_size, out_size, bias: bool) -> list[TensorLink]:
  """A GPT-2 Conv1D: weight already [in, out], bias [out]."""
  links = [TensorLink(ours + ("kernel",), hf + ".weight", (in_size, out_size))]
  if bias:
    links.append(TensorLink(ours + ("bias",), hf + ".bias", (out_size,)))
  return links


def _norm(ours, hf, width, bias: bool) -> list[TensorLink]:
  links = [TensorLink(ours + ("scale",), hf + ".weight", (width,))]
  if bias:
    links.append(TensorLink(ours + ("bias",), hf + ".bias", (width,)))
  return links


def _gpt2_links(c: ModelConfig) -> list[TensorLink]:
  w, m = c.width, c.hidden_width
  links = [TensorLink(("embed", "embedding"), "transformer.wte.weight", (c.vocab_size, w)),
           TensorLink(("pos_embed",), "transformer.wpe.weight", (c.max_length, w))]
  for i in range(c.num_layers):
    ours, hf = (f"block_{i}",), f"transformer.h.{i}"
    links += _norm(ours + ("attn_norm",), hf + ".ln_1", w, c.use_bias)
    # c_attn: [width, 3 * width], query | key | value along the last axis.
    for j, name in enumerate(("query", "key", "value")):
      part = (j * w, (j + 1) * w)
      links.append(TensorLink(ours + ("attn", name, "kernel"), hf + ".attn.c_attn.weight",
                         (w, 3 * w), part=part))
      if c.has_qkv_bias:
        links.append(TensorLink(ours + ("attn", name, "bias"), hf + ".attn.c_attn.bias", (3 * w,),
                           part=part))
    links += _conv1d(ours + ("attn", "out"), hf + ".attn.c_proj", w, w, c.use_bias)
    links += _norm(ours + ("mlp_norm",), hf + ".ln_2", w, c.use_bias)
    links += _conv1d(ours + ("mlp", "up"), hf + ".mlp.c_fc", w, m, c.has_mlp_bias)
    links += _conv1d(ours + ("mlp", "down"), hf + ".mlp.c_proj", m, w, c.has_mlp_bias)
  links += _norm(("final_norm",), "transformer.ln_f", w, c.use_bias)
  return links


def _llama_links(c: ModelConfig) -> list[TensorLink]:
  w, m = c.width, c.hidden_width
  q_size, kv_size = c.num_heads * c.head_dim, c.kv_heads * c.head_dim
  links = [TensorLink(("embed", "embedding"), "model.embed_tokens.weight", (c.vocab_size, w))]
  for i in range(c.num_layers):
    ours, hf = (f"block_{i}",), f"model.layers.{i}"
    links += _norm(ours + ("attn_norm",), hf + ".input_layernorm", w, False)
    links += _linear(ours + ("attn", "query"), hf + ".self_attn.q_proj", q_size, w, c.has_qkv_bias)
    links += _linear(ours + ("attn", "key"), hf + ".self_attn.k_proj", kv_size, w, c.has_qkv_bias)
    links += _linear(ours + ("attn", "value"), hf + ".self_attn.v_proj", kv_size, w,
                     c.has_qkv_bias)
    links += _linear(ours + ("attn", "out"), hf + ".self_attn.o_proj", w, q_size, c.use_bias)
    links += _norm(ours + ("mlp_norm",), hf + ".post_attention_layernorm", w, False)
    links += _linear(ours + ("mlp", "gate"), hf + ".mlp.gate_proj", m, w, c.has_mlp_bias)
    links += _linear(ours + ("mlp", "up"), hf + ".mlp.up_proj", m, w, c.has_mlp_bias)
    links += _linear(ours + ("mlp", "down"), hf + ".mlp.down_proj", w, m, c.has_mlp_bias)
  links += _norm(("final_norm",), "model.norm", w, False)
  return links


def tensor_links(config: ModelConfig) -> list[TensorLink]:
  """Every parameter leaf of `config` (unscanned paths) with its checkpoint tensor."""
  links = _gpt2_links(config) if config.family == "gpt2" else _llama_links(config)
  if not config.tie_embeddings:
    links.append(TensorLink(("lm_head", "kernel"), "lm_head.weight", (config.vocab_size,
                                                                  config.width), transpose=True))
  return links


def _body_prefix(config: ModelConfig) -> str:
  return "transformer." if config.family == "gpt2" else "model."


def abstract_params(config: ModelConfig):
  """The model's parameters as boxed ShapeDtypeStructs (logical axis names attached)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: Decoder(config).init(jax.random.key(0), tokens))["params"]


def unscanned_leaves(config: ModelConfig, flat_shapes: Mapping[tuple, Any]):
  """Maps each unscanned leaf path to (our leaf path, layer index or None).

  With scan_layers the blocks are stacked under "blocks" on a leading [layers] axis, so
  ("block_3", ...) lives at ("blocks", ...)[3].
  """
  where = {}
  for path in flat_shapes:
    if path[0] == "blocks":
      for i in range(config.num_layers):
        where[(f"block_{i}",) + path[1:]] = (path, i)
    else:
      where[path] = (path, None)
  return where


def check_links_cover(config: ModelConfig, links: list[TensorLink], where: Mapping) -> None:
  # A guard against this table and the model drifting apart.
  mapped = {link.ours for link in links}
  if mapped != set(where):
    raise AssertionError(f"hf tensor map out of date for {config}: unmapped "
                         f"{sorted(set(where) - mapped)}, unknown {sorted(mapped - set(where))}")


# ----------------------------------------------------------------------------- reading


class _Checkpoint:
  """The tensors of a (possibly sharded) safetensors checkpoint, read one at a time."""

  def __init__(self, directory: str | os.PathLike):
    from safetensors import safe_open  # imported here: only interop needs safetensors
    self._safe_open = safe_open
    self.directory = os.fspath(directory)
    index_path = os.path.join(self.directory, INDEX_FILE)
    single_path = os.path.join(self.directory, WEIGHTS_FILE)
    self._stack = contextlib.ExitStack()
    self._handles = {}  # (file, framework) -> open safe_open handle
    if os.path.exists(index_path):  # sharded: the index maps each tensor to its file
      with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
      self.file_of = {name: os.path.join(self.directory, file)
                      for name, file in weight_map.items()}
      for path in sorted(set(self.file_of.values())):
        if not os.path.exists(path):
          raise NotFound(f"checkpoint file {path} (listed in {INDEX_FILE}) is missing")
    elif os.path.exists(single_path):
      self.file_of = {name: single_path for name in self._handle(single_path).keys()}
    else:
      raise NotFound(
          f"{self.directory} has neither {WEIGHTS_FILE} nor {INDEX_FILE} (only safetensors "
          "checkpoints are read; re-save a pytorch_model.bin one with "
          "save_pretrained(..., safe_serialization=True))")

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._stack.close()

  def _handle(self, path: str, framework: str = "numpy"):
    if (path, framework) not in self._handles:
      self._handles[path, framework] = self._stack.enter_context(
          self._safe_open(path, framework=framework))
    return self._handles[path, framework]

  def names(self) -> set[str]:
    return set(self.file_of)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handle(self.file_of[name]).get_slice(name).get_shape())

  def read(self, name: str) -> np.ndarray:
    path = self.file_of[name]
    if self._handle(path).get_slice(name).get_dtype() in _NON_NUMPY_DTYPES:
      # numpy has no bfloat16: read through jax on the host CPU, then view it as numpy
      # (ml_dtypes provides the numpy dtype).
      with jax.default_device(_host_device()):
        return np.asarray(self._handle(path, "flax").get_tensor(name))
    return self._handle(path).get_tensor(name)


def _host_device():
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:  # no CPU backend (JAX_PLATFORMS excludes it): the default device
    return jax.devices()[0]


def _resolve_names(config: ModelConfig, links: list[TensorLink], names: set[str]) -> dict[str, str]:
  """Our expected names -> names in this checkpoint (a bare base model has no body prefix)."""
  prefix = _body_prefix(config)
  embed = links[0].hf  # the token embedding
  strip = embed not in names and embed.removeprefix(prefix) in names
  resolved = {}
  for link in links:
    name = link.hf.removeprefix(prefix) if strip and link.hf.startswith(prefix) else link.hf
    resolved[link.hf] = name
  return resolved


def _check_checkpoint(checkpoint: _Checkpoint, config: ModelConfig, links: list[TensorLink],
                      resolved: Mapping[str, str], strict: bool) -> None:
  """Every expected tensor present with its shape; nothing unexpected left over."""
  names = checkpoint.names()
  missing = sorted({resolved[link.hf] for link in links} - names)
  if missing:
    more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    raise ConfigError(f"{checkpoint.directory}: checkpoint lacks {len(missing)} tensor(s) this "
                      f"config needs: {', '.join(missing[:10])}{more}")
  for hf_name, expected in {link.hf: link.hf_shape for link in links}.items():
    name = resolved[hf_name]
    actual = checkpoint.shape(name)
    if actual != expected:
      raise ConfigError(f"{checkpoint.directory}: tensor {name!r} has shape {actual}, but "
                        f"the model config (from config.json) expects {expected}")
  used = set(resolved.values())
  tied_head = {"lm_head.weight"} if config.tie_embeddings else set()  # a saved duplicate
  unused = sorted(n for n in names - used - tied_head if not n.endswith(_BUFFER_SUFFIXES))
  if unused:
    message = (f"{checkpoint.directory}: {len(unused)} checkpoint tensor(s) are not used by "
               f"the {config.family} model: {', '.join(unused[:10])}"
               + (" ..." if len(unused) > 10 else ""))
    if strict:
      raise ConfigError(message + " (pass strict=False to load anyway)")
    warnings.warn(message)


def default_mesh() -> Mesh:
  return sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def place_on_devices(host: np.ndarray, sharding) -> jax.Array:
  # Each device (on every process) copies only its own slice of the host array.
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def read_hf_config(directory: str | os.PathLike) -> dict[str, Any]:
  path = os.path.join(os.fspath(directory), CONFIG_FILE)
  if not os.path.exists(path):
    raise NotFound(f"{path} is missing: not a Hugging Face model directory")
  with open(path) as f:
    return json.load(f)


def load_hf(directory: str | os.PathLike, *, mesh: Mesh | None = None,
            dtype: str | None = None, config_overrides: Mapping[str, Any] | None = None,
            strict: bool = True) -> tuple[ModelConfig, dict]:
  """Reads a Hugging Face checkpoint directory into (ModelConfig, params).

  Parameters are placed leaf by leaf with the shardings the logical-axis rules give on
  `mesh` (default: one device). `dtype` sets the parameter and compute dtypes (default:
  the checkpoint's); `config_overrides` sets other ModelConfig fields (e.g. scan_layers,
  attention_impl). With `strict`, checkpoint tensors the model does not use are an error
  (known buffers aside); otherwise a warning.
  """
  config = config_from_hf(read_hf_config(directory), dtype, **(config_overrides or {}))
  mesh = mesh or default_mesh()
  boxed = abstract_params(config)
  flat_shapes = traverse_util.flatten_dict(nn.unbox(boxed))
  flat_shardings = traverse_util.flatten_dict(sharding_lib.shardings_for(boxed, mesh))
  links = tensor_links(config)
  where = unscanned_leaves(config, flat_shapes)
  check_links_cover(config, links, where)
  link_of = {link.ours: link for link in links}
  param_dtype = jnp.dtype(config.param_dtype)

  with _Checkpoint(directory) as checkpoint:
    resolved = _resolve_names(config, links, checkpoint.names())
    _check_checkpoint(checkpoint, config, links, resolved, strict)

    def host_leaf(unscanned_path, shape):
      link = link_of[unscanned_path]
      tensor = checkpoint.read(resolved[link.hf])
      return link.to_ours(tensor, shape).astype(param_dtype)

    flat_params = {}
    for path, shape_struct in progress.track(flat_shapes.items(), f"reading {directory}",
                                             unit="arrays"):
      shape = shape_struct.shape
      if path[0] == "blocks":  # scanned: stack the layers, [layers, ...]
        host = np.stack([host_leaf((f"block_{i}",) + path[1:], shape[1:])
                         for i in range(config.num_layers)])
      else:
        host = host_leaf(path, shape)
      flat_params[path] = place_on_devices(host, flat_shardings[path])
      del host
  return config, traverse_util.unflatten_dict(flat_params)


# ----------------------------------------------------------------------------- writing


def _shard_plan(sizes: Mapping[str, int], max_shard_bytes: int) -> list[list[str]]:
  """Checkpoint tensor names (with their byte sizes) grouped into files of at most
  max_shard_bytes each, in order; a bigger tensor gets a file of its own."""
  shards, current, current_bytes = [], [], 0
  for name, size in sizes.items():
    if current and current_bytes + size > max_shard_bytes:
      shards.append(current)
      current, current_bytes = [], 0
    current.append(name)
    current_bytes += size
  return shards + [current]


@jax.jit
def _layer_of(stacked, layer):
  # One compiled slice per leaf shape, with the layer index traced (not one per layer).
  return jax.lax.dynamic_index_in_dim(stacked, layer, keepdims=False)


def save_hf(directory: str | os.PathLike, config: ModelConfig, params, *,
            dtype: str = "float32", max_shard_bytes: int = 5 * 2**30,
            extra_config: Mapping[str, Any] | None = None) -> str:
  """Writes `config.json` and safetensors weights that transformers loads.

  The model type follows the family: gpt2, or llama / qwen2 (q/k/v biases only). Biases
  the exported architecture has but `config` lacks are written as zeros, which computes
  the same function. `extra_config` adds or overrides config.json fields (e.g.
  bos_token_id / eos_token_id). Above `max_shard_bytes` the weights are split into
  several files with an index. Returns the model_type written.
  """
  if dtype not in _DTYPES:
    raise ConfigError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
  method = config.peft_method
  if method is not None:  # the export has no place for adapters: they would be dropped
    hint = ("fold it in first with decoder_jax.peft.merge(params, config) and export its "
            "result" if method in ("lora", "adalora") else
            "a Hugging Face checkpoint of the base architecture cannot hold it")
    raise ConfigError(f"config.{method} is set: {hint}")
  from safetensors.numpy import save_file  # imported here: only interop needs safetensors
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  wide = _export_config(config)
  links = tensor_links(wide)
  flat_params = traverse_util.flatten_dict(nn.unbox(params))
  flat_shapes = traverse_util.flatten_dict(nn.unbox(abstract_params(config)))
  if set(flat_params) != set(flat_shapes):
    raise ConfigError(f"params do not match the config: missing "
                      f"{sorted(set(flat_shapes) - set(flat_params))[:5]}, unexpected "
                      f"{sorted(set(flat_params) - set(flat_shapes))[:5]}")
  for path, leaf in flat_params.items():
    if tuple(leaf.shape) != tuple(flat_shapes[path].shape):
      raise ConfigError(f"param {'/'.join(path)} has shape {tuple(leaf.shape)}, the config "
                        f"implies {tuple(flat_shapes[path].shape)}")
  where = unscanned_leaves(config, flat_shapes)
  out_dtype = jnp.dtype(dtype)

  def leaf(link: TensorLink) -> np.ndarray:
    if link.ours not in where:  # a bias the export has and our model lacks
      return np.zeros(link.part_shape, out_dtype)
    path, layer = where[link.ours]
    value = flat_params[path] if layer is None else _layer_of(flat_params[path], layer)
    return link.to_hf(np.asarray(jax.device_get(value))).astype(out_dtype)

  by_name: dict[str, list[TensorLink]] = {}
  for link in links:
    by_name.setdefault(link.hf, []).append(link)
  sizes = {link.hf: math.prod(link.hf_shape) * out_dtype.itemsize for link in links}
  plan = _shard_plan(sizes, max_shard_bytes)
  files = ([WEIGHTS_FILE] if len(plan) == 1 else
           [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
  for names, file in zip(plan, files):
    tensors = {}
    for name in names:
      parts = sorted(by_name[name], key=lambda link: link.part or (0, 0))
      tensors[name] = np.ascontiguousarray(np.concatenate([leaf(p) for p in parts], axis=-1)
                                           if len(parts) > 1 else leaf(parts[0]))
    save_file(tensors, os.path.join(directory, file), metadata={"format": "pt"})
    del tensors
  stale = [WEIGHTS_FILE, INDEX_FILE] if len(plan) > 1 else [INDEX_FILE]
  for name in stale:  # an older export here would shadow or contradict this one
    if name not in files and os.path.exists(os.path.join(directory, name)):
      os.remove(os.path.join(directory, name))
  if len(plan) > 1:
    index = {"metadata": {"total_size": sum(sizes.values())},
             "weight_map": {name: file for names, file in zip(plan, files) for name in names}}
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
  hf_config = {**config_to_hf(config, dtype), **(extra_config or {})}
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(hf_config, f, indent=2)
  return hf_config["model_type"]

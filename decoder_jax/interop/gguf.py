"""llama.cpp GGUF files to (ModelConfig, params) and a tokenizer.

A GGUF holds the model's hyperparameters and its tokenizer as metadata, and its weights,
often quantized, as tensors named the llama.cpp way (`blk.3.attn_q.weight`). We read the
file with the `gguf` package (memory-mapped), dequantize one tensor at a time to float32,
rename it to its Hugging Face name and reuse `interop.hf`'s tensor map to reach our leaf.

Two llama.cpp conventions are undone on the way:
- tensors are stored like torch Linear weights, [out, in] (the GGUF shape lists the same
  dimensions fastest-first, [in, out]); our kernels are [in, out];
- llama.cpp's converter reorders the rows of the query and key projections so rotary
  pairs sit next to each other (dims 2i, 2i+1 of each head); our RoPE, like Hugging
  Face's, pairs dim i with dim i + head_dim/2. `_unpermute_rotary` restores that order.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from decoder_jax import progress
from decoder_jax.errors import ConfigError, NotFound
from decoder_jax.interop import hf
from decoder_jax.model.config import ModelConfig
from decoder_jax import sharding as sharding_lib

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor names -> Hugging Face Llama names: blk.N.<key> is model.layers.N.<value>.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(.+)")

_REQUIRED = object()


class UnsupportedGGUF(ConfigError):
  """The file uses an architecture, feature or tensor type decoder_jax cannot load."""


# ----------------------------------------------------------------------------- metadata


def open_gguf(source):
  """A `gguf.GGUFReader` for a path (an already open reader passes through)."""
  import gguf  # imported here: only GGUF import needs it

  if isinstance(source, gguf.GGUFReader):
    return source
  path = os.fspath(source)
  if not os.path.isfile(path):
    raise NotFound(f"GGUF file {path} does not exist")
  return gguf.GGUFReader(path)


def _file_name(reader) -> str:
  return str(getattr(reader.data, "filename", None) or "GGUF file")  # the reader's memmap


def metadata(reader, key: str, default: Any = _REQUIRED) -> Any:
  """One metadata value (a scalar, string or list), or `default` when absent."""
  field = reader.fields.get(key)
  if field is None:
    if default is _REQUIRED:
      raise UnsupportedGGUF(f"GGUF file lacks the metadata key {key!r}")
    return default
  return field.contents()


def config_from_gguf(reader, dtype: str | None = None, **overrides) -> ModelConfig:
  """A ModelConfig from a GGUF file's metadata.

  `dtype` (default float32: dequantized weights are float32) sets both the parameter and
  compute dtypes; `overrides` set any other field (scan_layers, attention_impl, ...).
  """
  arch = metadata(reader, "general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise UnsupportedGGUF(f"GGUF architecture {arch!r} is not supported; supported: "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)}")
  get = lambda name, default=_REQUIRED: metadata(reader, f"{arch}.{name}", default)  # noqa: E731
  width, heads = int(get("embedding_length")), int(get("attention.head_count"))
  kv_heads = get("attention.head_count_kv", heads)
  if isinstance(kv_heads, list):
    raise UnsupportedGGUF(f"per-layer key/value head counts {kv_heads} are not supported")
  head_dim = width // heads
  for key in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
    value = get(key, head_dim)
    if value != head_dim:
      raise UnsupportedGGUF(f"{arch}.{key}={value}, but decoder_jax needs head_dim = "
                            f"embedding_length / head_count = {head_dim}")
  scaling = get("rope.scaling.type", "none")
  if scaling != "none" or "rope_freqs.weight" in {t.name for t in reader.tensors}:
    raise UnsupportedGGUF(f"rope scaling ({scaling!r} / rope_freqs) is not supported")
  if get("expert_count", 0):
    raise UnsupportedGGUF("mixture-of-experts GGUF files are not supported")
  tokens = metadata(reader, "tokenizer.ggml.tokens", None)
  vocab_size = len(tokens) if tokens is not None else int(get("vocab_size"))
  has_head = any(t.name == "output.weight" for t in reader.tensors)
  dtype = dtype or "float32"
  fields = dict(family="llama", vocab_size=vocab_size, num_layers=int(get("block_count")),
                num_heads=heads, num_kv_heads=int(kv_heads), width=width,
                mlp_width=int(get("feed_forward_length")),
                max_length=int(get("context_length")), use_bias=False,
                tie_embeddings=not has_head, dropout=0.0,
                norm_eps=float(get("attention.layer_norm_rms_epsilon")),
                rope_theta=float(get("rope.freq_base", 10000.0)), dtype=dtype,
                param_dtype=dtype)
  return ModelConfig.from_dict({**fields, **overrides})


# ----------------------------------------------------------------------------- tensors


def hf_name(gguf_name: str) -> str | None:
  """The Hugging Face Llama name of a GGUF tensor, or None for names we do not know."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  match = _LAYER_PATTERN.fullmatch(gguf_name)
  if match and match.group(2) in _LAYER_NAMES:
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
  return None


def dequantize(tensor) -> np.ndarray:
  """A GGUF tensor as float32 in torch layout: [out, in] for matrices, [n] for vectors."""
  import gguf

  try:
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError as error:
    raise UnsupportedGGUF(
        f"tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, a type the gguf "
        f"package (and so decoder_jax) cannot dequantize") from error
  # GGUF lists dimensions fastest-first; the array is C-ordered, so reverse them.
  shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
  return np.asarray(values, np.float32).reshape(shape)


def _unpermute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row order. weight: [heads * head_dim, in].

  In the file, row 2i + j of a head holds what the HF layout keeps at row j*head_dim/2 + i
  (j in {0, 1}): view the head's rows as [head_dim/2, 2] and swap the two axes.
  """
  rows, cols = weight.shape
  head_dim = rows // heads
  return (weight.reshape(heads, head_dim // 2, 2, cols).swapaxes(1, 2)
          .reshape(rows, cols))


class _GGUFTensors:
  """The file's tensors under their Hugging Face names, dequantized on demand."""

  def __init__(self, reader, config: ModelConfig):
    self.config = config
    self.by_hf_name = {}
    unknown = []
    for tensor in reader.tensors:
      name = hf_name(tensor.name)
      if name is None:
        unknown.append(tensor.name)
      else:
        self.by_hf_name[name] = tensor
    if unknown:
      raise UnsupportedGGUF(f"GGUF tensor(s) {unknown[:10]} have no place in a decoder_jax "
                            f"{config.family} model")

  def gguf_name(self, name: str) -> str:
    return self.by_hf_name[name].name

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(self.by_hf_name[name].shape.tolist()))

  def read(self, name: str) -> np.ndarray:
    values = dequantize(self.by_hf_name[name])
    if name.endswith("self_attn.q_proj.weight"):
      values = _unpermute_rotary(values, self.config.num_heads)
    elif name.endswith("self_attn.k_proj.weight"):
      values = _unpermute_rotary(values, self.config.kv_heads)
    return values


def _check_tensors(tensors: _GGUFTensors, links, path: str) -> None:
  """Every tensor the config needs is in the file, with the shape the config implies."""
  missing = [link.hf for link in links if link.hf not in tensors.by_hf_name]
  if missing:
    raise ConfigError(f"{path}: GGUF file lacks {len(missing)} tensor(s) the model needs "
                      f"(Hugging Face names): {missing[:10]}")
  for link in links:
    actual = tensors.shape(link.hf)
    if actual != link.hf_shape:
      raise ConfigError(
          f"{path}: tensor {tensors.gguf_name(link.hf)!r} has shape {actual} ([out, in]), but "
          f"the file's metadata implies {link.hf_shape}")


def load_params(reader, config: ModelConfig, mesh=None) -> dict:
  """The params of `config` from an open GGUF reader, placed on `mesh` (default: one device).

  Tensors are dequantized one at a time and placed straight into their shards, so the
  host holds about one float32 tensor beyond the params.
  """
  path = _file_name(reader)
  mesh = mesh or hf.default_mesh()
  boxed = hf.abstract_params(config)
  flat_shapes = traverse_util.flatten_dict(nn.unbox(boxed))
  flat_shardings = traverse_util.flatten_dict(sharding_lib.shardings_for(boxed, mesh))
  links = hf.tensor_links(config)
  where = hf.unscanned_leaves(config, flat_shapes)
  hf.check_links_cover(config, links, where)
  link_of = {link.ours: link for link in links}
  tensors = _GGUFTensors(reader, config)
  _check_tensors(tensors, links, path)
  param_dtype = jnp.dtype(config.param_dtype)

  def host_leaf(unscanned_path, shape):
    link = link_of[unscanned_path]
    return link.to_ours(tensors.read(link.hf), shape).astype(param_dtype, copy=False)

  flat_params = {}
  for leaf_path, shape_struct in progress.track(flat_shapes.items(), f"dequantizing {path}",
                                                unit="arrays"):
    shape = shape_struct.shape
    if leaf_path[0] == "blocks":  # scan_layers: stack the layers, [layers, ...]
      host = np.stack([host_leaf((f"block_{i}",) + leaf_path[1:], shape[1:])
                       for i in range(config.num_layers)])
    else:
      host = host_leaf(leaf_path, shape)
    flat_params[leaf_path] = hf.place_on_devices(host, flat_shardings[leaf_path])
    del host
  return traverse_util.unflatten_dict(flat_params)


def load_gguf(source, *, mesh=None, dtype: str | None = None,
              config_overrides: Mapping[str, Any] | None = None) -> tuple[ModelConfig, dict]:
  """Reads a GGUF file (a path or an open `gguf.GGUFReader`) into (ModelConfig, params).

  `mesh`: where the params go (default: one device), sharded by the logical-axis rules.
  `dtype` sets the parameter and compute dtypes (default float32); `config_overrides`
  other ModelConfig fields (scan_layers, attention_impl, ...).
  """
  reader = open_gguf(source)
  config = config_from_gguf(reader, dtype, **(config_overrides or {}))
  return config, load_params(reader, config, mesh)


def load_gguf_with_tokenizer(path, *, mesh=None, dtype: str | None = None,
                             config_overrides: Mapping[str, Any] | None = None):
  """(ModelConfig, params, tokenizer) from one read of a GGUF file.

  The parsed vocabulary (~100k small numpy objects, ~100 MB for a 49k-token vocabulary)
  is dropped once the tokenizer is built, before the weights arrive, which lowers the
  peak host memory of the load by about that much.
  """
  reader = open_gguf(path)
  config = config_from_gguf(reader, dtype, **(config_overrides or {}))
  tokenizer = tokenizer_from_gguf(reader)
  if reader is not path:  # our own reader: nobody else sees its fields
    for key in [k for k in reader.fields if k.startswith("tokenizer.ggml.")]:
      del reader.fields[key]
  return config, load_params(reader, config, mesh), tokenizer


# ----------------------------------------------------------------------------- tokenizer

# llama.cpp token types (tokenizer.ggml.token_type).
_CONTROL, _USER_DEFINED = 3, 4

# tokenizer.ggml.pre -> the regex that splits text before byte-level BPE, where it is not
# GPT-2's (the byte-level default). These are llama.cpp's pre-tokenizer expressions.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT}
_GPT2_STYLE = ("default", "gpt2", "smollm")


def _pre_tokenizer(pre: str):
  from tokenizers import Regex, pre_tokenizers

  if pre in _GPT2_STYLE:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # SmolLM's vocabulary was trained on single digits
      return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                      byte_level])
    return byte_level
  if pre in _SPLITS:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  raise UnsupportedGGUF(f"GGUF pre-tokenizer {pre!r} is not supported; supported: "
                        f"{', '.join(sorted(_GPT2_STYLE + tuple(_SPLITS)))}")


def _byte_level_bpe(reader):
  """The file's byte-level BPE vocabulary as a `tokenizers.Tokenizer`."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, processors

  tokens = metadata(reader, "tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in metadata(reader, "tokenizer.ggml.merges")]
  vocab = {token: index for index, token in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise UnsupportedGGUF(f"the GGUF vocabulary lists {len(tokens) - len(vocab)} token(s) twice")
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
  tokenizer.pre_tokenizer = _pre_tokenizer(metadata(reader, "tokenizer.ggml.pre", "default"))
  tokenizer.decoder = decoders.ByteLevel()
  # Control tokens (<|im_start|>, ...) match whole in text and count as special;
  # user-defined ones match whole too but decode like text.
  types = metadata(reader, "tokenizer.ggml.token_type", [])
  special = [AddedToken(t, special=True, normalized=False)
             for t, kind in zip(tokens, types) if kind == _CONTROL]
  user = [AddedToken(t, special=False, normalized=False)
          for t, kind in zip(tokens, types) if kind == _USER_DEFINED]
  tokenizer.add_special_tokens(special)
  tokenizer.add_tokens(user)
  bos_id = metadata(reader, "tokenizer.ggml.bos_token_id", None)
  eos_id = metadata(reader, "tokenizer.ggml.eos_token_id", None)
  add_bos = bos_id is not None and metadata(reader, "tokenizer.ggml.add_bos_token", False)
  add_eos = eos_id is not None and metadata(reader, "tokenizer.ggml.add_eos_token", False)
  if add_bos or add_eos:
    before = [tokens[bos_id]] if add_bos else []
    after = [tokens[eos_id]] if add_eos else []
    tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join(before + ["$A"] + after),
        pair=" ".join(before + ["$A"] + after + before + ["$B"] + after),
        special_tokens=[(tokens[i], i) for i in {bos_id, eos_id} if i is not None])
  return tokenizer


def tokenizer_from_gguf(source):
  """The file's tokenizer as an `HFTokenizer` (encode/decode, bos/eos ids, chat template).

  Only byte-level BPE vocabularies (`tokenizer.ggml.model` "gpt2": SmolLM2, Llama 3,
  Qwen2, ...) are rebuilt; SentencePiece ones ("llama") are not supported yet.
  """
  from decoder_jax.interop.hf_tokenizer import HFTokenizer

  reader = open_gguf(source)
  model = metadata(reader, "tokenizer.ggml.model", None)
  if model != "gpt2":
    raise UnsupportedGGUF(f"GGUF tokenizer model {model!r} is not supported (only 'gpt2', "
                          "byte-level BPE)")
  tokenizer = _byte_level_bpe(reader)
  tokens = metadata(reader, "tokenizer.ggml.tokens")
  bos_id = metadata(reader, "tokenizer.ggml.bos_token_id", None)
  # End of text, then end of turn / of message where the file names them: all stop.
  eos_ids = [metadata(reader, f"tokenizer.ggml.{key}_token_id", None)
             for key in ("eos", "eot", "eom")]
  eos_ids = [int(i) for i in eos_ids if i is not None]
  config = {"bos_token": None if bos_id is None else tokens[bos_id],
            "eos_token": tokens[eos_ids[0]] if eos_ids else None,
            "add_bos_token": bool(metadata(reader, "tokenizer.ggml.add_bos_token", False))}
  unk = metadata(reader, "tokenizer.ggml.unknown_token_id", None)
  pad = metadata(reader, "tokenizer.ggml.padding_token_id", None)
  if unk is not None:
    config["unk_token"] = tokens[unk]
  if pad is not None:
    config["pad_token"] = tokens[pad]
  ids = {"bos_token_id": None if bos_id is None else int(bos_id), "eos_token_id": eos_ids}
  return HFTokenizer(tokenizer.to_str(), config,
                     chat_template=metadata(reader, "tokenizer.chat_template", None),
                     generation_config=ids)

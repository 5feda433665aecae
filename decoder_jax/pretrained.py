"""`load_pretrained(source)`: a pretrained model, its params and tokenizer, ready to decode
(`inference.generate_batch`, `inference.complete`) or to fine-tune.

Sources:
  "gguf:FILE"  a llama.cpp GGUF file (quantized weights are dequantized);
  "hf:DIR"     a Hugging Face model directory (config.json, safetensors, tokenizer.json);
  "DIR"        a Hugging Face directory, or one written by `python -m decoder_jax.convert`;
  "FILE.gguf"  the same as "gguf:FILE";
  "fetch:NAME" a model decoder_jax downloads into its cache on first use
               (interop.fetch.FETCHABLE: "smollm2-135m-instruct").
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax

from decoder_jax import progress, sharding as sharding_lib
from decoder_jax.data import tokenizers
from decoder_jax.errors import ConfigError, NotFound
from decoder_jax.model.config import ModelConfig
from decoder_jax.workdir import CHECKPOINTS_DIR, MODEL_CONFIG_FILE, TrainedModel, with_dtype

PARAMS_DIR = "params"  # a converted directory's orbax checkpoint of the params
SOURCE_FILE = "converted_from.json"


def check_vocab(config: ModelConfig, tokenizer, source: str) -> None:
  """Refuses a model whose embedding table and tokenizer disagree on the vocabulary size."""
  if tokenizer.vocab_size != config.vocab_size:
    raise ConfigError(
        f"{source}: the checkpoint's vocabulary has {config.vocab_size} tokens but its "
        f"tokenizer has {tokenizer.vocab_size}; they must match")


def _load_gguf(path: str, mesh, dtype):
  from decoder_jax.interop import gguf

  return gguf.load_gguf_with_tokenizer(path, mesh=mesh, dtype=dtype)


def _load_hf(directory: str, mesh, dtype):
  from decoder_jax.interop import hf
  from decoder_jax.interop.hf_tokenizer import HFTokenizer

  config, params = hf.load_hf(directory, mesh=mesh, dtype=dtype)
  return config, params, HFTokenizer.load(directory)


def _load_converted(directory: str, mesh, dtype):
  """A directory written by `decoder_jax.convert`: model_config.json, params/, tokenizer."""
  import orbax.checkpoint as ocp
  from decoder_jax.interop import hf

  with open(os.path.join(directory, MODEL_CONFIG_FILE)) as f:
    config = ModelConfig.from_dict(json.load(f))
  boxed = hf.abstract_params(config)
  shardings = sharding_lib.shardings_for(boxed, mesh or hf.default_mesh())
  abstract = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  with (progress.all_at_once(f"restoring {directory}", len(jax.tree.leaves(abstract)), "arrays"),
        ocp.StandardCheckpointer() as checkpointer):
    params = checkpointer.restore(os.path.abspath(os.path.join(directory, PARAMS_DIR)), abstract)
  trained = with_dtype(TrainedModel(config, params, tokenizers.load_tokenizer(directory)), dtype)
  return trained.config, trained.params, trained.tokenizer


def _resolve(source: str) -> tuple[str, str]:
  """(kind, path) with kind one of "gguf", "hf", "converted"."""
  kind, sep, rest = source.partition(":")
  if sep and kind == "fetch":
    from decoder_jax.interop import fetch

    return "gguf", str(fetch.fetch(rest))
  if sep and kind not in ("gguf", "hf") and not os.path.exists(os.path.expanduser(source)):
    raise ConfigError(f"pretrained source {source!r}: unknown kind {kind!r}; give gguf:FILE, "
                      "hf:DIR, fetch:NAME or a directory written by python -m "
                      "decoder_jax.convert")
  if sep and kind in ("gguf", "hf"):
    path = os.path.expanduser(rest)
    if kind == "gguf" and not os.path.isfile(path):
      raise NotFound(f"GGUF file {path} does not exist")
    if kind == "hf" and not os.path.isdir(path):
      raise NotFound(f"Hugging Face model directory {path} does not exist")
    return kind, path
  path = os.path.expanduser(source)
  if os.path.isfile(path) and path.endswith(".gguf"):
    return "gguf", path
  if not os.path.isdir(path):
    raise NotFound(f"pretrained source {source!r}: no such directory (or give "
                   "gguf:FILE / hf:DIR)")
  if os.path.isdir(os.path.join(path, PARAMS_DIR)) and os.path.exists(
      os.path.join(path, MODEL_CONFIG_FILE)):
    return "converted", path
  if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):  # (its config.json is not HF's)
    raise ConfigError(f"{path} is a training workdir: load it with inference.load_trained "
                      "(python -m decoder_jax.generate --workdir=...)")
  if os.path.exists(os.path.join(path, "config.json")):
    return "hf", path
  raise ConfigError(f"{path} is neither a Hugging Face model directory (config.json) nor one "
                    "written by python -m decoder_jax.convert (model_config.json, params/)")


def load_pretrained(source: str, *, mesh=None, dtype: str | None = None
                    ) -> TrainedModel:
  """Loads a pretrained model: `.config` (ModelConfig), `.params`, `.tokenizer`.

  `mesh`: where the params go, sharded by the logical-axis rules (default: one device).
  `dtype`: parameter and compute dtype (default: float32 for GGUF, the checkpoint's own
  otherwise). Raises ValueError when the checkpoint's vocabulary size differs from its
  tokenizer's.
  """
  kind, path = _resolve(source)
  loader = {"gguf": _load_gguf, "hf": _load_hf, "converted": _load_converted}[kind]
  config, params, tokenizer = loader(path, mesh, dtype)
  check_vocab(config, tokenizer, source)
  return TrainedModel(config, params, tokenizer, step=0)

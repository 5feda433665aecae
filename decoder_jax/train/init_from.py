"""`config.init_from`: start training from pretrained weights instead of a random init.

The source is anything `decoder_jax.load_pretrained` reads ("gguf:FILE", "hf:DIR", a
directory written by `python -m decoder_jax.convert`) or another run's training workdir
(its latest checkpoint). The architecture (widths, heads, vocabulary, ...) and the
tokenizer come from the source; the fields below are training choices and come from
the experiment's `config.model` section instead.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import traverse_util

from decoder_jax.model import ModelConfig

# ModelConfig fields the training config decides; every other field is the checkpoint's.
TRAINING_FIELDS = ("dtype", "param_dtype", "matmul_dtype", "attention_impl", "remat",
                   "scan_layers", "dropout", "lora", "adalora", "adapter", "prompt", "prefix")
PEFT_FIELDS = ("lora", "adalora", "adapter", "prompt", "prefix")


def _is_training_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints")) and os.path.exists(
      os.path.join(path, "model_config.json"))


def relayout_layers(params: dict, num_layers: int, scan_layers: bool) -> dict:
  """Params with the blocks stacked under "blocks" ([layers, ...], scan_layers=True) or
  one subtree per layer ("block_0", ...); a no-op when they already are."""
  flat = traverse_util.flatten_dict(params)
  stacked = any(path[0] == "blocks" for path in flat)
  if stacked == scan_layers:
    return params
  out = {}
  for path, leaf in flat.items():
    if scan_layers and path[0].startswith("block_"):
      continue  # gathered below, all layers at once
    if not scan_layers and path[0] == "blocks":
      for i in range(num_layers):
        out[(f"block_{i}",) + path[1:]] = leaf[i]
    else:
      out[path] = leaf
  if scan_layers:
    for path in {p[1:] for p in flat if p[0].startswith("block_")}:
      out[("blocks",) + path] = jnp.stack([flat[(f"block_{i}",) + path]
                                           for i in range(num_layers)])
  return traverse_util.unflatten_dict(out)


def training_config(source_config: ModelConfig, model_section) -> ModelConfig:
  """The source's architecture with the training choices of `model_section`."""
  choices = {name: model_section.get(name) for name in TRAINING_FIELDS}
  for name in PEFT_FIELDS:
    if hasattr(choices[name], "to_dict"):  # a ConfigDict section
      choices[name] = choices[name].to_dict()
  return dataclasses.replace(source_config, **choices)


def load(source: str, model_section, mesh):
  """The pretrained model to start from: params in `model_section.param_dtype`, laid out
  (scan or not) and sharded on `mesh` as training wants them."""
  # Imported here: both modules import train.loop, which imports this one.
  from decoder_jax import inference, pretrained

  path = os.path.expanduser(source)
  if _is_training_workdir(path):
    start = inference.load_trained(path)
  else:
    start = pretrained.load_pretrained(source, mesh=mesh)
  config = training_config(start.config, model_section)
  params = relayout_layers(start.params, config.num_layers, config.scan_layers)
  # The source has no adapters: lay its leaves out as the plain model's.
  shardings = inference.param_shardings(
      dataclasses.replace(config, **dict.fromkeys(PEFT_FIELDS)), mesh)
  cast = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(jnp.dtype(config.param_dtype)), p),
                 out_shardings=shardings)
  return inference.TrainedModel(config, cast(params), start.tokenizer)

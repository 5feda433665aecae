"""Parameter-efficient fine-tuning: LoRA, AdaLoRA, bottleneck adapters, prompt and prefix
tuning, behind one interface.

Each method is a ModelConfig field (config.lora, .adalora, .adapter, .prompt, .prefix;
at most one set) and a module here with the same functions:

  is_param(path)                  whether a param leaf belongs to the method
  init_params(config, base, rng)  a pretrained tree plus the method's fresh leaves
  merge(params, config)           (params, config) with the method folded away where it
                                  can be (LoRA, AdaLoRA: into the kernels; prefix: the
                                  MLP reparametrisation); ConfigError where it cannot

The functions below dispatch on the config; split / combine / count work on any tree.
"""

from __future__ import annotations

from decoder_jax.errors import ConfigError
from decoder_jax.model.config import (AdaLoraConfig, AdapterConfig, LoraConfig, ModelConfig,
                                      PrefixConfig, PromptConfig)
from decoder_jax.peft import adalora, adapter, lora, prefix, prompt
from decoder_jax.peft.common import combine, count, split
from decoder_jax.peft.lora import check_targets, init_lora_params, is_lora_param

METHODS = {"lora": lora, "adalora": adalora, "adapter": adapter, "prompt": prompt,
           "prefix": prefix}
# Methods whose merge leaves the plain model (no method left in the config).
MERGE_TO_PLAIN = ("lora", "adalora")


def method_of(config: ModelConfig):
  """The module of the config's method, or None for a plain model."""
  name = config.peft_method
  return None if name is None else METHODS[name]


def _is_lora_leaf(path, leaf=None):
  return lora.is_lora_param(path)


def is_method_param(config: ModelConfig):
  """(path, leaf) -> whether the leaf belongs to the config's method (False when none)."""
  method = method_of(config)
  if method is None:
    return lambda path, leaf=None: False
  if method is lora:
    return _is_lora_leaf
  return lambda path, leaf=None: method.is_param(path)


def trainable_predicate(config: ModelConfig):
  """(path, leaf) -> whether the param trains: all of them for a plain model, else the
  method's leaves and any classification head."""
  if config.peft_method is None:
    return lambda path, leaf: True
  mine = is_method_param(config)
  return lambda path, leaf: mine(path) or path[0] == "cls_head"


def check(config: ModelConfig, base_params=None, seq_len: int | None = None) -> None:
  """ConfigError for a method that cannot run on this model, before anything compiles:
  targets matching nothing or ranks beyond a layer's (LoRA, AdaLoRA), or a soft prompt
  or prefix that leaves no room for `seq_len` tokens in the context."""
  name = config.peft_method
  if name in ("lora", "adalora"):
    METHODS[name].check_targets(config, base_params)
  if seq_len is not None:
    prompt.check_fits(config, seq_len)


def init_params(config: ModelConfig, base_params, rng):
  """`base_params` plus the method's fresh leaves, initialised as the method wants."""
  method = method_of(config)
  if method is None:
    raise ConfigError("the model config sets no parameter-efficient method")
  return method.init_params(config, base_params, rng)


def init_from_base(config: ModelConfig, params, rng) -> dict:
  """{path: leaf} for the method's leaves whose start depends on the pretrained weights
  (a soft prompt from vocabulary embeddings, a prefix from real-token activations);
  empty for the other methods (their random init is their start)."""
  method = method_of(config)
  return method.init_from_base(config, params, rng) if hasattr(method, "init_from_base") else {}


def can_merge(config: ModelConfig) -> bool:
  return config.peft_method in MERGE_TO_PLAIN or config.peft_method == "prefix"


def merge(params, config: ModelConfig):
  """(params, config) with the method folded away where it allows (see the module doc)."""
  method = method_of(config)
  if method is None:
    raise ConfigError("the model config sets no parameter-efficient method to merge")
  return method.merge(params, config)


def for_inference(params, config: ModelConfig):
  """(params, config) to decode with: merged where the method allows, else as trained."""
  if config.peft_method is None or not can_merge(config):
    return params, config
  return merge(params, config)


__all__ = ["AdaLoraConfig", "AdapterConfig", "LoraConfig", "METHODS", "PrefixConfig",
           "PromptConfig", "adalora", "adapter", "can_merge", "check", "check_targets",
           "combine", "count", "for_inference", "init_from_base", "init_lora_params",
           "init_params", "is_lora_param", "is_method_param", "lora", "merge", "method_of",
           "prefix", "prompt", "split", "trainable_predicate"]

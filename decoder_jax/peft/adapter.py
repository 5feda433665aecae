"""Bottleneck adapters (Houlsby et al., 2019; the parallel variant of He et al., 2022).

The model holds them (transformer.Block adds "adapter_attn" / "adapter_mlp", each a
layers.Adapter with down and up Dense layers, where config.adapter names the sublayer).
An adapter is nonlinear, so it cannot be folded into the base weights: inference runs
the adapted model as it is.
"""

from __future__ import annotations

from typing import Any

from decoder_jax.errors import ConfigError
from decoder_jax.model.config import ModelConfig
from decoder_jax.peft.common import add_fresh_leaves, name_of

MODULES = ("adapter_attn", "adapter_mlp")


def is_param(path, leaf: Any = None) -> bool:
  del leaf
  return any(name_of(k) in MODULES for k in path)


def init_params(config: ModelConfig, base_params, rng):
  """`base_params` plus fresh adapters (near the identity, see AdapterConfig)."""
  return add_fresh_leaves(config, base_params, is_param, rng)


def merge(params, config: ModelConfig):
  raise ConfigError("bottleneck adapters (model.adapter) are nonlinear and cannot be merged "
                    "into the base weights; run the adapted model as it is")

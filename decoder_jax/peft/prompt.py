"""Prompt tuning (Lester et al., 2021): trained embeddings the model reads before the input.

The model holds them ("prompt_embeddings" [n, embed], see transformer.Decoder); they are
not a function of the input, so their keys and values in every layer are computed once
per forward (once per decode, through Decoder's `prefix_only`). Nothing folds them into
the base weights: inference runs with them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from decoder_jax.errors import ConfigError
from decoder_jax.model.config import ModelConfig
from decoder_jax.peft.common import add_leaves_from_base, name_of

LEAF = "prompt_embeddings"


def is_param(path, leaf: Any = None) -> bool:
  del leaf
  return bool(path) and name_of(path[-1]) == LEAF


def sampled_ids(config: ModelConfig, init_vocab: int, rng) -> jax.Array:
  """int32 [n]: token ids drawn uniformly from the first min(init_vocab, vocab) ids
  (in BPE vocabularies the earliest merges are the most frequent pieces)."""
  return jax.random.randint(rng, (config.prefix_length,), 0,
                            min(init_vocab, config.vocab_size), jnp.int32)


def init_from_base(config: ModelConfig, params, rng) -> dict:
  """{path: new leaf}: with init "vocab", the soft prompt as the base embeddings of
  sampled tokens; nothing with init "random"."""
  if config.prompt.init != "vocab":
    return {}
  flat = traverse_util.flatten_dict(params)
  table = flat[("embed", "embedding")]
  table = getattr(table, "value", table)  # [vocab, embed]
  ids = sampled_ids(config, config.prompt.init_vocab, rng)
  return {(LEAF,): jnp.take(table, ids, axis=0).astype(table.dtype)}


def init_params(config: ModelConfig, base_params, rng):
  """`base_params` plus the soft prompt (initialised per config.prompt.init)."""
  return add_leaves_from_base(config, base_params, is_param, init_from_base, rng)


def merge(params, config: ModelConfig):
  raise ConfigError("a soft prompt (model.prompt) is not part of any weight and cannot be "
                    "merged; run the prompted model as it is")


def check_fits(config: ModelConfig, seq_len: int, where: str = "the sequence length") -> None:
  """ConfigError unless n prefix positions plus `seq_len` fit config.max_length."""
  n = config.prefix_length
  if n and n + seq_len > config.max_length:
    method = "prompt" if config.prompt is not None else "prefix"
    raise ConfigError(f"model.{method}.length={n} plus {where} ({seq_len}) exceeds the "
                      f"model's context (max_length={config.max_length})")



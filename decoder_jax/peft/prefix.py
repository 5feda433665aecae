"""Prefix tuning (Li and Liang, 2021): trained keys and values every layer's attention
sees before the input.

The model holds them (transformer.PrefixKV under "prefix": "kv" [layers, 2, kv_heads, n,
head_dim], plus during training the MLP reparametrisation "embedding", "mlp_in",
"mlp_out"). They start as the keys and values the pretrained model computes for n
sampled real tokens (`init_from_base`); `fold` computes kv + MLP(embedding) once and
drops the MLP, leaving the prefix the decode loop reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from decoder_jax.model import Decoder, ModelConfig, init_cache
from decoder_jax.peft.common import add_leaves_from_base, name_of
from decoder_jax.peft.prompt import sampled_ids

MODULE = "prefix"


def is_param(path, leaf: Any = None) -> bool:
  del leaf
  return bool(path) and name_of(path[0]) == MODULE


def real_token_kv(config: ModelConfig, params, ids) -> jax.Array:
  """[layers, 2, kv_heads, n, head_dim]: the keys and values of tokens `ids` [n] at
  positions 0..n-1 in the plain model (config without the prefix) with `params`."""
  plain = dataclasses.replace(config, prefix=None)
  base = {k: v for k, v in nn.unbox(params).items() if k != MODULE}
  n = ids.shape[0]
  cache = init_cache(plain, 1, n, jnp.dtype(plain.dtype))
  _, cache = Decoder(plain).apply({"params": base}, ids[None], cache=cache, empty_cache=True)
  layers = cache["layers"]
  if not plain.scan_layers:
    layers = jax.tree.map(lambda *a: jnp.stack(a), *layers)  # [layers, 1, kv, n, d]
  return jnp.stack([layers["k"][:, 0], layers["v"][:, 0]], axis=1)


def init_from_base(config: ModelConfig, params, rng) -> dict:
  """{("prefix", "kv"): the keys and values of sampled real tokens} (Li and Liang's
  initialisation from real-word activations)."""
  ids = sampled_ids(config, config.prefix.init_vocab, rng)
  kv = jax.jit(real_token_kv, static_argnums=0)(config, params, ids)
  return {(MODULE, "kv"): kv.astype(jnp.dtype(config.param_dtype))}


def init_params(config: ModelConfig, base_params, rng):
  """`base_params` plus a prefix initialised from real-token activations."""
  return add_leaves_from_base(config, base_params, is_param, init_from_base, rng)


def fold(params, config: ModelConfig):
  """(params with the prefix computed once into "prefix/kv", config with
  reparam_hidden=None): the same model without the MLP. A no-op when already folded."""
  if config.prefix.reparam_hidden is None:
    return nn.unbox(params), config
  params = nn.unbox(params)
  prefix = Decoder(config).apply({"params": params}, jnp.zeros((1, 1), jnp.int32),
                                 prefix_only=True)  # {"k", "v"}: [layers, kv, n, d]
  kv = jnp.stack([prefix["k"], prefix["v"]], axis=1)
  folded = {k: v for k, v in params.items() if k != MODULE}
  folded[MODULE] = {"kv": kv.astype(params[MODULE]["kv"].dtype)}
  return folded, dataclasses.replace(
      config, prefix=dataclasses.replace(config.prefix, reparam_hidden=None))


merge = fold  # the one merge prefix tuning allows: the reparametrisation, not the prefix

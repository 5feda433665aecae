"""LoRA on the model's Dense layers: target checks, init, merge and param-tree partitioning.

The adapters live in the model itself (layers.Dense adds lora_a / lora_b when
`config.lora` selects it), so a LoRA model is the ordinary Decoder with a few extra leaves
in its "params" tree. This module holds the tree-level operations around it: checking
the targets before training, adding fresh adapters to a pretrained tree, splitting the
tree into a trainable and a frozen half, and folding the adapters back into the kernels
for inference and export.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax import traverse_util

from decoder_jax.model.config import ModelConfig
from decoder_jax.peft.common import (add_fresh_leaves, check_dense_targets, combine, count,
                                     name_of, split)

LORA_LEAVES = ("lora_a", "lora_b")

__all__ = ["LORA_LEAVES", "check_targets", "combine", "count", "init_lora_params",
           "is_lora_param", "merge", "split"]


def is_lora_param(path, leaf: Any = None) -> bool:
  """Whether the param at `path` (a tuple of names, or a jax key path) is a LoRA leaf.

  Takes (and ignores) a leaf so it can be passed straight to `split` as the predicate.
  """
  del leaf
  return bool(path) and name_of(path[-1]) in LORA_LEAVES


def check_targets(config: ModelConfig, base_params=None) -> list[str]:
  """The module paths ("block_3/attn/query", ...) that config.lora.targets select;
  ConfigError for a pattern matching nothing, a rank beyond a layer's, or base params
  that do not fit (see common.check_dense_targets)."""
  return check_dense_targets(config, "lora", base_params)


def init_lora_params(config: ModelConfig, base_params, rng):
  """`base_params` (a base model tree, e.g. pretrained) plus fresh lora_a / lora_b leaves,
  boxed exactly when `base_params` is."""
  check_targets(config, base_params)
  return add_fresh_leaves(config, base_params, is_lora_param, rng)


def merge(params, config: ModelConfig):
  """Folds each adapter into its kernel: (base params, config with lora=None).

  kernel + scaling * lora_a @ lora_b is computed in float32 and cast back to the kernel's
  dtype; the result runs on the plain model (inference, decoding, interop.hf.save_hf).
  Returns unboxed arrays.
  """
  lora = config.lora
  if lora is None:
    raise ValueError("config.lora is None: there is nothing to merge")
  flat = traverse_util.flatten_dict(nn.unbox(params))
  modules = sorted({path[:-1] for path in flat if is_lora_param(path)})
  if not modules:
    raise ValueError("config.lora is set but params hold no lora_a / lora_b leaves")
  merged = {path: leaf for path, leaf in flat.items() if not is_lora_param(path)}
  for m in modules:
    a, b, kernel = flat[m + ("lora_a",)], flat[m + ("lora_b",)], flat[m + ("kernel",)]
    # a: [(layers,) n_in, rank], b: [(layers,) rank, n_out]; kernel: [(layers,) *in, *out]
    delta = lora.scaling * (a.astype(jnp.float32) @ b.astype(jnp.float32))
    merged[m + ("kernel",)] = (kernel.astype(jnp.float32)
                               + delta.reshape(kernel.shape)).astype(kernel.dtype)
  return traverse_util.unflatten_dict(merged), dataclasses.replace(config, lora=None)

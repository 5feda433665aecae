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
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import meta

from decoder_jax.errors import ConfigError
from decoder_jax.model.config import ModelConfig, pattern_selects
from decoder_jax.model.transformer import Decoder

LORA_LEAVES = ("lora_a", "lora_b")

Path = tuple[str, ...]


def _name(key) -> str:
  # Plain strings from flatten_dict, or jax key-path entries (DictKey, GetAttrKey).
  return getattr(key, "key", getattr(key, "name", key))


def is_lora_param(path, leaf: Any = None) -> bool:
  """Whether the param at `path` (a tuple of names, or a jax key path) is a LoRA leaf.

  Takes (and ignores) a leaf so it can be passed straight to `split` as the predicate.
  """
  del leaf
  return bool(path) and _name(path[-1]) in LORA_LEAVES


def _abstract_params(config: ModelConfig) -> dict[Path, jax.ShapeDtypeStruct]:
  """The flat, unboxed param shapes of Decoder(config), without computing anything."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  boxed = jax.eval_shape(lambda: Decoder(config).init(jax.random.key(0), tokens))["params"]
  return traverse_util.flatten_dict(nn.unbox(boxed))


def _short(path: Path) -> str:
  return "/".join(path[-2:])


def check_targets(config: ModelConfig, base_params=None) -> list[str]:
  """The module paths ("block_3/attn/query", ...) that config.lora.targets select.

  Raises ValueError, so a run fails before training rather than silently adapting nothing,
  when a pattern matches no Dense module, when the rank exceeds min(n_in, n_out) of a
  targeted layer, or when `base_params` (the base model's tree, concrete or from
  eval_shape, boxed or not; None to skip) lacks a targeted kernel or has another shape.
  """
  lora = config.lora
  if lora is None:
    raise ValueError("config.lora is None: set model.lora (a LoraConfig) to use LoRA")
  flat = _abstract_params(config)  # the adapter shapes exactly as layers.Dense makes them
  modules = [path[:-1] for path in flat if path[-1] == "kernel"]  # every Dense
  for pattern in lora.targets:
    if not any(pattern_selects(pattern, m) for m in modules):
      names = sorted(dict.fromkeys(_short(m) for m in modules))
      raise ConfigError(f"model.lora.targets: pattern {pattern!r} matches no Dense module; "
                        f"available (last two path components): {names}")
  targeted = [m for m in modules if lora.is_target(m)]
  for m in targeted:
    n_in, n_out = flat[m + ("lora_a",)].shape[-2], flat[m + ("lora_b",)].shape[-1]
    if lora.rank > min(n_in, n_out):
      raise ConfigError(
          f"model.lora.rank={lora.rank} exceeds min(n_in, n_out) = {min(n_in, n_out)} of "
          f"{'/'.join(m)} (kernel {tuple(flat[m + ('kernel',)].shape)}, {n_in} -> {n_out})")
  if base_params is not None:
    base = traverse_util.flatten_dict(nn.unbox(base_params))
    for m in targeted:
      want, got = flat[m + ("kernel",)], base.get(m + ("kernel",))
      if got is None:
        raise ConfigError(f"base params have no kernel at {'/'.join(m)}; is the tree from "
                          f"another config (e.g. scan_layers={not config.scan_layers})?")
      if tuple(got.shape) != tuple(want.shape):
        raise ConfigError(f"base kernel {'/'.join(m)} has shape {tuple(got.shape)}, the "
                          f"config implies {tuple(want.shape)}")
  return ["/".join(m) for m in targeted]


def init_lora_params(config: ModelConfig, base_params, rng):
  """`base_params` (a base model tree, e.g. pretrained) plus fresh lora_a / lora_b leaves.

  The leaves come from Decoder(config).init under jit with every other output dropped, so
  XLA never materialises a second copy of the base weights. They are boxed
  (nn.Partitioned, with logical axis names) exactly when `base_params` is.
  """
  check_targets(config, base_params)
  base = traverse_util.flatten_dict(base_params)
  if any(is_lora_param(path) for path in base):
    raise ValueError("base_params already hold LoRA leaves (lora_a / lora_b); merge or "
                     "drop them first")
  boxed = any(isinstance(leaf, meta.AxisMetadata) for leaf in base.values())
  tokens = jnp.zeros((1, 1), jnp.int32)

  @jax.jit
  def lora_leaves(rng):
    flat = traverse_util.flatten_dict(Decoder(config).init(rng, tokens)["params"])
    return {path: leaf for path, leaf in flat.items() if is_lora_param(path)}

  new = lora_leaves(rng)
  if not boxed:
    new = nn.unbox(new)
  return traverse_util.unflatten_dict({**base, **new})


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


def split(params, predicate: Callable[[Path, Any], bool]):
  """(trainable, frozen): the leaves where predicate(path, leaf) holds, and the rest.

  Both halves are plain nested dicts (pytrees), so grads can be taken w.r.t. `trainable`
  alone and `frozen` can be stored in another dtype. `combine` undoes it.
  """
  flat = traverse_util.flatten_dict(params)
  trainable = {path: leaf for path, leaf in flat.items() if predicate(path, leaf)}
  frozen = {path: leaf for path, leaf in flat.items() if path not in trainable}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def combine(trainable, frozen):
  """The full param tree from the two halves of `split`."""
  flat_t, flat_f = traverse_util.flatten_dict(trainable), traverse_util.flatten_dict(frozen)
  both = sorted(set(flat_t) & set(flat_f))
  if both:
    raise ValueError(f"combine: {len(both)} leaves are in both halves, e.g. "
                     f"{['/'.join(p) for p in both[:3]]}")
  return traverse_util.unflatten_dict({**flat_f, **flat_t})


def count(params, predicate: Callable[[Path, Any], bool] = is_lora_param) -> tuple[int, int]:
  """(parameters where predicate holds, all parameters), e.g. to report the trainable share."""
  flat = traverse_util.flatten_dict(nn.unbox(params))
  sizes = {path: math.prod(leaf.shape) for path, leaf in flat.items()}
  selected = sum(n for path, n in sizes.items() if predicate(path, flat[path]))
  return selected, sum(sizes.values())

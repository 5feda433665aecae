"""Tree-level operations every parameter-efficient method shares: selecting leaves by
name, splitting a param tree into trainable and frozen halves, counting, adding fresh
leaves to a pretrained tree, and checking Dense-layer targets before training."""

from __future__ import annotations

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

Path = tuple[str, ...]


def name_of(key) -> str:
  # Plain strings from flatten_dict, or jax key-path entries (DictKey, GetAttrKey).
  return getattr(key, "key", getattr(key, "name", key))


def names(path) -> list[str]:
  return [name_of(k) for k in path]


def abstract_params(config: ModelConfig) -> dict[Path, jax.ShapeDtypeStruct]:
  """The flat, unboxed param shapes of Decoder(config), without computing anything."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  boxed = jax.eval_shape(lambda: Decoder(config).init(jax.random.key(0), tokens))["params"]
  return traverse_util.flatten_dict(nn.unbox(boxed))


def _short(path: Path) -> str:
  return "/".join(path[-2:])


def check_dense_targets(config: ModelConfig, section: str, base_params=None) -> list[str]:
  """The module paths ("block_3/attn/query", ...) that config.<section>.targets select,
  for the low-rank methods (section "lora": lora_a [n_in, rank] / lora_b; "adalora":
  adalora_p [n_in, init_rank] / adalora_q).

  Raises ConfigError, so a run fails before training rather than silently adapting
  nothing, when a pattern matches no Dense module, when the rank exceeds min(n_in, n_out)
  of a targeted layer, or when `base_params` (the base model's tree, concrete or from
  eval_shape, boxed or not; None to skip) lacks a targeted kernel or has another shape.
  """
  method = getattr(config, section)
  if method is None:
    raise ConfigError(f"config.{section} is None: set model.{section} to use it")
  in_leaf, out_leaf, rank_name = {"lora": ("lora_a", "lora_b", "rank"),
                                  "adalora": ("adalora_p", "adalora_q", "init_rank")}[section]
  rank = getattr(method, rank_name)
  flat = abstract_params(config)  # the adapter shapes exactly as layers.Dense makes them
  modules = [path[:-1] for path in flat if path[-1] == "kernel"]  # every Dense
  for pattern in method.targets:
    if not any(pattern_selects(pattern, m) for m in modules):
      found = sorted(dict.fromkeys(_short(m) for m in modules))
      raise ConfigError(f"model.{section}.targets: pattern {pattern!r} matches no Dense "
                        f"module; available (last two path components): {found}")
  targeted = [m for m in modules if method.is_target(m)]
  for m in targeted:
    n_in, n_out = flat[m + (in_leaf,)].shape[-2], flat[m + (out_leaf,)].shape[-1]
    if rank > min(n_in, n_out):
      raise ConfigError(
          f"model.{section}.{rank_name}={rank} exceeds min(n_in, n_out) = {min(n_in, n_out)} "
          f"of {'/'.join(m)} (kernel {tuple(flat[m + ('kernel',)].shape)}, {n_in} -> {n_out})")
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


def add_fresh_leaves(config: ModelConfig, base_params, is_new: Callable, rng):
  """`base_params` plus the leaves of Decoder(config) where is_new(path), freshly
  initialised.

  The leaves come from Decoder(config).init under jit with every other output dropped, so
  XLA never materialises a second copy of the base weights. They are boxed
  (nn.Partitioned, with logical axis names) exactly when `base_params` is.
  """
  base = traverse_util.flatten_dict(base_params)
  already = [p for p in base if is_new(p)]
  if already:
    raise ValueError(f"base_params already hold {config.peft_method} leaves, e.g. "
                     f"{'/'.join(already[0])}; merge or drop them first")
  boxed = any(isinstance(leaf, meta.AxisMetadata) for leaf in base.values())
  tokens = jnp.zeros((1, 1), jnp.int32)

  @jax.jit
  def fresh(rng):
    flat = traverse_util.flatten_dict(Decoder(config).init(rng, tokens)["params"])
    return {path: leaf for path, leaf in flat.items() if is_new(path)}

  new = fresh(rng)
  if not boxed:
    new = nn.unbox(new)
  return traverse_util.unflatten_dict({**base, **new})


def add_leaves_from_base(config: ModelConfig, base_params, is_new: Callable,
                         init_from_base: Callable, rng):
  """add_fresh_leaves, then the leaves init_from_base(config, params, rng) -> {path: value}
  returns replaced by those values (kept in their boxes when boxed): for methods whose
  start depends on the pretrained weights."""
  fresh_rng, init_rng = jax.random.split(rng)
  params = add_fresh_leaves(config, base_params, is_new, fresh_rng)
  flat = traverse_util.flatten_dict(params)
  for path, value in init_from_base(config, params, init_rng).items():
    box = flat[path]
    flat[path] = box.replace_boxed(value) if hasattr(box, "replace_boxed") else value
  return traverse_util.unflatten_dict(flat)


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


def count(params, predicate: Callable[[Path, Any], bool]) -> tuple[int, int]:
  """(parameters where predicate holds, all parameters), e.g. to report the trainable share."""
  flat = traverse_util.flatten_dict(nn.unbox(params))
  sizes = {path: math.prod(leaf.shape) for path, leaf in flat.items()}
  selected = sum(n for path, n in sizes.items() if predicate(path, flat[path]))
  return selected, sum(sizes.values())

"""The decoder-only Transformer shared by the gpt2 and llama families."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from decoder_jax.model import attention, layers
from decoder_jax.model.config import ModelConfig


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""
  config: ModelConfig
  deterministic: bool = True
  empty_cache: bool = False  # see Decoder.__call__

  @nn.compact
  def __call__(self, x, positions, cache=None):  # x: [batch, length, embed]
    cfg = self.config
    h, cache = attention.SelfAttention(cfg, self.deterministic, self.empty_cache, name="attn")(
        layers.norm(cfg, "attn_norm")(x), positions, cache)
    x = x + h
    x = x + layers.Mlp(cfg, self.deterministic, name="mlp")(layers.norm(cfg, "mlp_norm")(x))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, cache


class _ScannedBlock(Block):
  """Block with the (carry, per-layer input) -> (carry, per-layer output) signature of scan."""

  def __call__(self, x, layer_cache, positions):
    return super().__call__(x, positions, layer_cache)


def _rematted(block_cls, policy: str, **kwargs):
  """block_cls under the config's rematerialisation policy (see REMAT_POLICIES)."""
  if policy == "none":
    return block_cls
  saveable = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
              if policy == "dots_saveable" else None)
  return nn.remat(block_cls, policy=saveable, **kwargs)


class Decoder(nn.Module):
  """tokens [batch, length] -> logits [batch, length, vocab] (and the updated cache).

  `positions` (int32 [batch, length]) default to 0..length-1. With `cache` (from
  `init_cache`), keys and values are written at those positions and queries attend to
  everything cached at or before their own position: this one path serves prefill and
  one-token decode steps alike.

  With `num_labels`, the model also holds a sequence-classification head ("cls_head", on
  the final hidden state of one position per row): called with `last_index` (int32
  [batch], each row's final non-padding position) it returns class logits
  [batch, num_labels] in float32 instead of token logits.

  `return_hidden` returns the final normalised hidden states [batch, length, embed]
  instead of logits, for losses that apply the output projection themselves in chunks
  (train/steps.py), never holding [batch, length, vocab] logits. `logits_at` (int32
  [batch]) returns token logits [batch, vocab] of one position per row only, for
  objectives that score a single position (label words).

  `empty_cache` (a prefill): the chunk is the start of every row, positions
  0..length-1 (so `positions` must be left out), and its queries attend causally over
  the chunk's own keys (also written to the cache, slots 0..length-1) instead of over
  every cache slot, most of which are masked: the same logits, without scoring all
  [length, cache_length] query-slot pairs.
  """
  config: ModelConfig
  num_labels: int = 0

  @nn.compact
  def __call__(self, tokens, positions=None, cache=None, deterministic: bool = True,
               last_index=None, return_hidden: bool = False, logits_at=None,
               empty_cache: bool = False):
    cfg = self.config
    batch, length = tokens.shape
    if empty_cache and (positions is not None or cache is None):
      # Attention over the chunk alone is right only from position 0 (slots before the
      # chunk would be skipped); positions built here cannot be otherwise.
      raise ValueError("empty_cache=True is a prefill from position 0: pass a cache and no "
                       "positions (they are 0..length-1)")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    embed = nn.Embed(cfg.vocab_size, cfg.width, dtype=layers.dtype_of(cfg.dtype),
                     param_dtype=layers.dtype_of(cfg.param_dtype),
                     embedding_init=layers.normal_init(cfg.init_std, ("vocab", "embed")),
                     name="embed")
    x = embed(tokens)  # [batch, length, embed]
    if not cfg.use_rope:
      pos_table = self.param("pos_embed", layers.normal_init(cfg.init_std, ("length", "embed")),
                             (cfg.max_length, cfg.width), layers.dtype_of(cfg.param_dtype))
      x = x + jnp.take(pos_table, positions, axis=0).astype(x.dtype)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    if cfg.scan_layers:
      x, cache = self._scanned_layers(x, positions, cache, deterministic, empty_cache)
    else:
      block_cls = _rematted(Block, cfg.remat)
      new_layers = []
      for i in range(cfg.num_layers):
        layer_cache = None if cache is None else cache["layers"][i]
        x, layer_cache = block_cls(cfg, deterministic, empty_cache, name=f"block_{i}")(
            x, positions, layer_cache)
        new_layers.append(layer_cache)
      cache = None if cache is None else {"layers": new_layers}

    x = layers.norm(cfg, "final_norm")(x)
    if return_hidden:
      return x, cache
    if self.num_labels:
      rows = jnp.arange(batch)
      index = jnp.full((batch,), length - 1) if last_index is None else last_index
      pooled = x[rows, index]  # [batch, embed]
      head = layers.Dense((cfg.width,), (self.num_labels,), ("embed", None), cfg,
                          cfg.init_std, use_bias=True, name="cls_head")
      class_logits = head(pooled).astype(jnp.float32)  # [batch, num_labels]
      if last_index is not None:
        return class_logits, cache
    elif last_index is not None:
      raise ValueError("last_index selects a position for the classification head; this "
                       "Decoder has num_labels=0")
    if logits_at is not None:
      x = x[jnp.arange(batch), logits_at][:, None, :]  # [batch, 1, embed]
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = layers.dense(cfg.vocab_size, ("embed", "vocab"), cfg, cfg.init_std, "lm_head",
                            use_bias=False, deterministic=deterministic)(x)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    if logits_at is not None:
      return logits[:, 0], cache  # [batch, vocab]
    return logits, cache

  def _scanned_layers(self, x, positions, cache, deterministic, empty_cache):
    cfg = self.config
    block_cls = _rematted(_ScannedBlock, cfg.remat, prevent_cse=False)
    scanned = nn.scan(
        block_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0, nn.broadcast),
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, deterministic, empty_cache, name="blocks")
    layer_caches = None if cache is None else cache["layers"]
    x, layer_caches = scanned(x, layer_caches, positions)
    return x, (None if cache is None else {"layers": layer_caches})


def init_cache(config: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
  """An empty KV cache for `batch` rows of up to `length` positions.

  {"layers": per-layer {"k", "v"}: [batch, kv_heads, length, head_dim]}; with
  scan_layers the per-layer dicts are stacked on a leading [layers] axis.
  """
  if length > config.max_length and not config.use_rope:
    raise ValueError(f"cache length {length} exceeds the model's max_length {config.max_length}")
  one = attention.init_layer_cache(config, batch, length, dtype)
  if config.scan_layers:
    stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (config.num_layers,) + a.shape), one)
    return {"layers": stacked}
  return {"layers": [attention.init_layer_cache(config, batch, length, dtype)
                     for _ in range(config.num_layers)]}


def resize_cache(cache: dict, length: int) -> dict:
  """`cache` (from init_cache) with `length` slots: cut, or zero-padded at the end. Slots
  beyond a row's position are never read, so a cache grown this way decodes as one
  allocated at full length."""
  def one(a):  # [..., slots, head_dim]
    slots = a.shape[-2]
    if length <= slots:
      return a[..., :length, :]
    return jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, length - slots), (0, 0)])
  return jax.tree.map(one, cache)

"""The decoder-only Transformer shared by the gpt2 and llama families."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from decoder_jax.model import attention, layers
from decoder_jax.model.config import ModelConfig


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

  With config.adapter, a bottleneck adapter ("adapter_attn", "adapter_mlp") on the
  sublayers it names: x + h + adapter(h) (sequential, h the sublayer's output) or
  x + h + scale * adapter(norm(x)) (parallel).
  """
  config: ModelConfig
  deterministic: bool = True
  empty_cache: bool = False  # see Decoder.__call__

  @nn.compact
  def __call__(self, x, positions, cache=None, slots=None, prefix=None):
    # x: [batch, length, embed]; slots and prefix: see SelfAttention
    cfg = self.config
    normed = layers.norm(cfg, "attn_norm")(x)
    h, cache = attention.SelfAttention(cfg, self.deterministic, self.empty_cache, name="attn")(
        normed, positions, cache, slots, prefix)
    x = x + self._adapted("attn", normed, h)
    normed = layers.norm(cfg, "mlp_norm")(x)
    h = layers.Mlp(cfg, self.deterministic, name="mlp")(normed)
    x = x + self._adapted("mlp", normed, h)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, cache

  def _adapted(self, sublayer: str, normed, h):
    """The sublayer's output h with its adapter's, if config.adapter names the sublayer."""
    adapter = self.config.adapter
    if adapter is None or sublayer not in adapter.where:
      return h
    branch = layers.Adapter(self.config, name=f"adapter_{sublayer}")
    if adapter.placement == "parallel":
      return h + adapter.scale * branch(normed)
    return h + branch(h)


class _ScannedBlock(Block):
  """Block with the (carry, per-layer input) -> (carry, per-layer output) signature of
  scan: the per-layer input is (cache, prefix), either None, the broadcast one
  (positions, slots)."""

  def __call__(self, x, per_layer, broadcast):
    (layer_cache, layer_prefix), (positions, slots) = per_layer, broadcast
    return super().__call__(x, positions, layer_cache, slots, layer_prefix)


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

  With config.prompt (a soft prompt) or config.prefix (prefix tuning), every layer's
  queries also see n keys and values before the input, and the input's positions (RoPE,
  learned positions) start at n; `positions` and the cache keep counting from 0 (the
  prefix is not in the cache). The soft prompt's keys and values are computed by running
  its embeddings through the blocks; `prefix_only=True` returns the prefix itself
  ({"k", "v"}: [layers, kv_heads, n, head_dim], `tokens` unused), which `prefix` then
  takes, so a decode loop computes it once instead of at every step.

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
               empty_cache: bool = False, prefix=None, prefix_only: bool = False):
    cfg = self.config
    batch, length = tokens.shape
    if empty_cache and (positions is not None or cache is None):
      # Attention over the chunk alone is right only from position 0 (slots before the
      # chunk would be skipped); positions built here cannot be otherwise.
      raise ValueError("empty_cache=True is a prefill from position 0: pass a cache and no "
                       "positions (they are 0..length-1)")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    slots, positions = positions, positions + cfg.prefix_length  # [batch, length] each
    embed = nn.Embed(cfg.vocab_size, cfg.width, dtype=layers.dtype_of(cfg.dtype),
                     param_dtype=layers.dtype_of(cfg.param_dtype),
                     embedding_init=layers.normal_init(cfg.init_std, ("vocab", "embed")),
                     name="embed")
    pos_table = None
    if not cfg.use_rope:
      pos_table = self.param("pos_embed", layers.normal_init(cfg.init_std, ("length", "embed")),
                             (cfg.max_length, cfg.width), layers.dtype_of(cfg.param_dtype))
    blocks = self._blocks(deterministic, empty_cache)
    if cfg.prefix_length and prefix is None:
      prefix = self._prefix(blocks, pos_table, deterministic)
    if prefix_only:
      return prefix
    x = self._embedded(embed(tokens), pos_table, positions, deterministic)
    x, cache = blocks(x, positions, slots, cache, prefix)

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

  def _embedded(self, x, pos_table, positions, deterministic):
    """Token (or soft prompt) embeddings x [batch, length, embed] with learned positions
    added (gpt2) and dropout."""
    if pos_table is not None:
      x = x + jnp.take(pos_table, positions, axis=0).astype(x.dtype)
    x = nn.Dropout(self.config.dropout)(x, deterministic=deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))

  def _blocks(self, deterministic, empty_cache):
    """The layers as one function (x, positions, slots, cache, prefix) -> (x, cache),
    callable more than once (the soft prompt's pass, then the input's)."""
    cfg = self.config
    if cfg.scan_layers:
      scanned = nn.scan(
          _rematted(_ScannedBlock, cfg.remat, prevent_cse=False),
          variable_axes={"params": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(0, nn.broadcast),
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, deterministic, empty_cache, name="blocks")

      def run_scanned(x, positions, slots, cache, prefix):
        layer_caches = None if cache is None else cache["layers"]
        x, layer_caches = scanned(x, (layer_caches, prefix), (positions, slots))
        return x, (None if cache is None else {"layers": layer_caches})
      return run_scanned

    block_cls = _rematted(Block, cfg.remat)
    blocks = [block_cls(cfg, deterministic, empty_cache, name=f"block_{i}")
              for i in range(cfg.num_layers)]

    def run_blocks(x, positions, slots, cache, prefix):
      new_layers = []
      for i, block in enumerate(blocks):
        layer_cache = None if cache is None else cache["layers"][i]
        layer_prefix = None if prefix is None else jax.tree.map(lambda a: a[i], prefix)
        x, layer_cache = block(x, positions, layer_cache, slots, layer_prefix)
        new_layers.append(layer_cache)
      return x, (None if cache is None else {"layers": new_layers})
    return run_blocks

  def _prefix(self, blocks, pos_table, deterministic):
    """{"k", "v"}: [layers, kv_heads, n, head_dim], the keys and values every layer's
    queries see before the input: prefix tuning's parameters, or the soft prompt's
    keys and values (its embeddings run through the blocks, at positions 0..n-1)."""
    cfg = self.config
    if cfg.prefix is not None:
      return PrefixKV(cfg, name="prefix")()
    n = cfg.prompt.length
    soft = self.param("prompt_embeddings", layers.normal_init(cfg.init_std, (None, "embed")),
                      (n, cfg.width), layers.dtype_of(cfg.param_dtype))
    at = jnp.arange(n, dtype=jnp.int32)[None]  # [1, n]
    x = self._embedded(soft[None].astype(layers.dtype_of(cfg.dtype)), pos_table, at,
                       deterministic)
    _, cache = blocks(x, at, at, init_cache(cfg, 1, n, layers.dtype_of(cfg.dtype)), None)
    kv = cache["layers"]
    if not cfg.scan_layers:  # one {"k", "v"} per layer: stacked like the scanned cache
      kv = jax.tree.map(lambda *a: jnp.stack(a), *kv)
    return jax.tree.map(lambda a: a[:, 0], kv)  # [layers, kv_heads, n, head_dim]


class PrefixKV(nn.Module):
  """Prefix tuning's keys and values {"k", "v"}: [layers, kv_heads, n, head_dim].

  "kv" [layers, 2, kv_heads, n, head_dim] holds them; with reparam_hidden, an MLP
  (embedding [n, embed] -> tanh hidden -> every layer's keys and values) adds its output,
  zero at init (its output layer starts at zero).
  """
  config: ModelConfig

  @nn.compact
  def __call__(self):
    cfg = self.config
    prefix = cfg.prefix
    n, dtype = prefix.length, layers.dtype_of(cfg.param_dtype)
    shape = (cfg.num_layers, 2, cfg.kv_heads, n, cfg.head_dim)
    kv = self.param("kv", layers.normal_init(cfg.init_std, ("layers", None, "kv_heads", None,
                                                            "kv")), shape, dtype)
    if prefix.reparam_hidden is not None:
      seed = self.param("embedding", layers.normal_init(1.0, (None, "embed")), (n, cfg.width),
                        dtype)
      h = layers.Dense((cfg.width,), (prefix.reparam_hidden,), ("embed", None), cfg,
                       cfg.init_std, use_bias=True, name="mlp_in")(seed)  # [n, hidden]
      out = nn.Dense(cfg.num_layers * 2 * cfg.kv_heads * cfg.head_dim, use_bias=True,
                     kernel_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                              (None, None)),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                            (None,)),
                     param_dtype=dtype, name="mlp_out")(jnp.tanh(h))  # [n, L*2*K*H]
      out = out.reshape(n, cfg.num_layers, 2, cfg.kv_heads, cfg.head_dim)
      kv = kv + out.transpose(1, 2, 3, 0, 4).astype(kv.dtype)
    return {"k": kv[:, 0], "v": kv[:, 1]}


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

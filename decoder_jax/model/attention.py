"""Causal self-attention (multi-head or grouped-query) with an explicit KV cache.

The cache for one layer is a dict {"k", "v"}: [batch, cache_length, kv_heads, head_dim].
Slot s of a row holds the key/value of that row's token at absolute position s, so rows
of a ragged batch each keep their own positions. A query at position p sees slots <= p;
slots beyond a row's current position may hold stale values and are never visible.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from decoder_jax.model import layers
from decoder_jax.model.config import ModelConfig


def init_layer_cache(config: ModelConfig, batch: int, length: int, dtype) -> dict:
  shape = (batch, length, config.kv_heads, config.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _write(cache_kv, new_kv, start):
  """Writes new_kv [batch, T, K, H] into cache_kv [batch, S, K, H] at per-row start [batch]."""
  def one_row(c, n, s):
    return jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (s, 0, 0))
  return jax.vmap(one_row)(cache_kv, new_kv, start)


def cudnn_supports(dtype, head_dim: int) -> bool:
  """Whether to hand these inputs to cuDNN's fused (flash) attention: half-precision
  operands and a head_dim that is a multiple of 8, at most 128 (conservative: larger
  heads need newer cuDNN versions). Anything else falls back to XLA."""
  return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128


def resolve_implementation(name: str, dtype="bfloat16", head_dim: int = 64,
                           backend: str | None = None) -> str | None:
  """The jax.nn.dot_product_attention implementation for config.attention_impl: "auto" is
  cuDNN on a GPU when cuDNN supports the inputs, else XLA."""
  if name == "auto":
    backend = backend or jax.default_backend()
    use_cudnn = backend == "gpu" and cudnn_supports(dtype, head_dim)
    return "cudnn" if use_cudnn else "xla"
  return name


def einsum_attention(q, k, v, mask, bf16_operands: bool = False):
  """Attention written out as two einsums: q [batch, length, heads, head_dim]; k, v
  [batch, keys, kv_heads, head_dim]; mask bool, broadcastable to [batch, length, keys]
  (True: may attend) -> [batch, length, heads, head_dim]. Scores and softmax in float32.
  Grouped-query heads are a reshape of q (no copies of k and v). attention_impl="einsum".
  `bf16_operands`: both einsums on bfloat16-rounded operands (layers.mixed_einsum).
  """
  batch, length, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)  # [b, t, kv, group, d]
  if bf16_operands:
    scores = layers.mixed_einsum("btkgd,bskd->bkgts", q, k)
  else:
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores * head_dim**-0.5  # [b, kv, g, t, s]
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  if bf16_operands:
    out = layers.mixed_einsum("bkgts,bskd->btkgd", probs, v).astype(v.dtype)
  else:
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)  # [b, t, kv, group, d]
  return out.reshape(batch, length, heads, head_dim)


def attend(q, k, v, implementation, mask=None, bf16_operands: bool = False):
  """Causal self-attention (mask None) or masked attention over a cache, by implementation.
  `bf16_operands` applies to the einsum implementation only."""
  if implementation == "einsum":
    if mask is None:
      mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None]  # [1, length, keys]
    return einsum_attention(q, k, v, mask, bf16_operands)
  if mask is None:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
  # The masked (cache) path runs through XLA: cuDNN wants causal/padding masks only.
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask[:, None],
      implementation="xla" if implementation == "cudnn" else implementation)


class SelfAttention(nn.Module):
  config: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, positions, cache=None):
    """x: [batch, length, embed]; positions: int32 [batch, length].

    Returns (out [batch, length, embed], updated cache or None).
    """
    cfg = self.config
    bias = cfg.has_qkv_bias
    det = self.deterministic
    q = layers.dense((cfg.num_heads, cfg.head_dim), ("embed", "heads", "kv"), cfg,
                     cfg.init_std, "query", bias, det)(x)  # [batch, length, heads, head_dim]
    k = layers.dense((cfg.kv_heads, cfg.head_dim), ("embed", "kv_heads", "kv"), cfg,
                     cfg.init_std, "key", bias, det)(x)  # [batch, length, kv_heads, head_dim]
    v = layers.dense((cfg.kv_heads, cfg.head_dim), ("embed", "kv_heads", "kv"), cfg,
                     cfg.init_std, "value", bias, det)(x)
    if cfg.use_rope:
      cos, sin = layers.rotary_tables(positions, cfg.head_dim, cfg.rope_theta)
      q = layers.apply_rotary(q, cos, sin)
      k = layers.apply_rotary(k, cos, sin)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "kv"))
    v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "kv"))

    implementation = resolve_implementation(cfg.attention_impl, q.dtype, cfg.head_dim)
    mixed = layers.bf16_matmuls(cfg)
    if cache is None:
      out = attend(q, k, v, implementation, bf16_operands=mixed)
      new_cache = None
    else:
      start = positions[:, 0]  # [batch]; the chunk's positions are contiguous
      new_cache = {"k": _write(cache["k"], k, start), "v": _write(cache["v"], v, start)}
      slots = jnp.arange(new_cache["k"].shape[1])  # [cache_length]
      mask = slots[None, None, :] <= positions[:, :, None]  # [batch, length, cache_length]
      out = attend(q, new_cache["k"].astype(q.dtype), new_cache["v"].astype(q.dtype),
                   implementation, mask, bf16_operands=mixed)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    out = layers.dense(cfg.width, ("heads", "kv", "embed"), cfg, layers.residual_std(cfg),
                       "out", deterministic=det)(out)  # [batch, length, embed]
    out = nn.Dropout(cfg.dropout)(out, deterministic=self.deterministic)
    return out, new_cache

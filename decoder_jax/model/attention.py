"""Causal self-attention (multi-head or grouped-query) with an explicit KV cache.

The cache for one layer is a dict {"k", "v"}: [batch, kv_heads, cache_length, head_dim],
the layout the attention products read (heads as a batch axis, then slots); a
[batch, length, kv_heads, head_dim] cache made XLA copy every layer's whole cache into
this layout at every decode step (31% of a batch-64 SmolLM2-135M step on CPU). Slot s of
a row holds the key/value of that row's token at absolute position s, so rows of a
ragged batch each keep their own positions. A query at position p sees slots <= p;
slots beyond a row's current position may hold stale values and are never visible.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from decoder_jax.model import layers
from decoder_jax.model.config import ModelConfig


def init_layer_cache(config: ModelConfig, batch: int, length: int, dtype) -> dict:
  shape = (batch, config.kv_heads, length, config.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _write(cache_kv, new_kv, start, round_to_bf16: bool = False):
  """Writes new_kv [batch, T, K, H] into cache_kv [batch, K, S, H] at per-row start [batch].

  `round_to_bf16`: store the values rounded to bfloat16 (in the cache's own dtype), as
  bfloat16-operand attention would read them; a one-token step then reads the cache
  without converting it. (A bfloat16 cache would be half the memory, but XLA's CPU
  backend widens a bfloat16 scatter to float32, converting the whole cache twice.)
  """
  if round_to_bf16:
    new_kv = new_kv.astype(jnp.bfloat16)
  def one_row(c, n, s):  # c: [K, S, H]; n: [K, T, H]
    return jax.lax.dynamic_update_slice(c, n, (0, s, 0))
  return jax.vmap(one_row)(cache_kv, new_kv.astype(cache_kv.dtype).swapaxes(1, 2), start)


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


def einsum_attention(q, k, v, mask, bf16_operands: bool = False, kv_layout: str = "bskd",
                     prefix=None):
  """Attention written out as two einsums: q [batch, length, heads, head_dim]; k, v
  [batch, keys, kv_heads, head_dim] (kv_layout "bskd") or [batch, kv_heads, keys, head_dim]
  ("bksd", the cache's layout); mask bool, broadcastable to [batch, length, keys] (True:
  may attend) -> [batch, length, heads, head_dim]. Scores and softmax in float32.
  Grouped-query heads are a reshape of q (no copies of k and v). attention_impl="einsum".
  `bf16_operands`: both einsums on bfloat16-rounded operands (layers.mixed_einsum).

  `prefix` ({"k", "v"}: [kv_heads, n, head_dim], the same for every row: a soft prompt's
  or prefix tuning's keys and values) adds n keys every query sees. Its scores join the
  softmax beside the others', so neither the keys nor a cache is copied to make room.
  """
  if kv_layout not in ("bskd", "bksd"):
    raise ValueError(f"kv_layout must be 'bskd' or 'bksd', got {kv_layout!r}")
  batch, length, heads, head_dim = q.shape
  kv_heads = k.shape[kv_layout.index("k")]
  q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)  # [b, t, kv, group, d]
  einsum = layers.mixed_einsum if bf16_operands else functools.partial(
      jnp.einsum, preferred_element_type=jnp.float32)
  scores = einsum(f"btkgd,{kv_layout}->bkgts", q, k)  # float32 [b, kv, g, t, s]
  scores = scores * head_dim**-0.5
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  if prefix is not None:
    prefix_k, prefix_v = prefix["k"].astype(q.dtype), prefix["v"].astype(v.dtype)
    prefix_scores = einsum("btkgd,ksd->bkgts", q, prefix_k) * head_dim**-0.5  # [b,kv,g,t,n]
    scores = jnp.concatenate([prefix_scores, scores], axis=-1)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  if prefix is not None:
    n = prefix_k.shape[1]
    prefix_probs, probs = probs[..., :n], probs[..., n:]
  if kv_layout == "bskd":
    out = einsum("bkgts,bskd->btkgd", probs, v)  # [b, t, kv, group, d]
  else:
    # Product in XLA's natural order, then transposed: with bf16 operands, XLA's CPU
    # backend fails at run time on "bkgts,bksd->btkgd" for some shapes (Unsupported
    # element type for DotThunk, 9 of 64 small shapes tried) and on none this way.
    out = einsum("bkgts,bksd->bkgtd", probs, v).transpose(0, 3, 1, 2, 4)
  if prefix is not None:
    out = out + einsum("bkgts,ksd->bkgtd", prefix_probs, prefix_v).transpose(0, 3, 1, 2, 4)
  return out.astype(q.dtype).reshape(batch, length, heads, head_dim)


def attend(q, k, v, implementation, bf16_operands: bool = False, prefix=None,
           causal: bool = True, kv_lengths=None):
  """Self- or cross-attention: q [batch, length, heads, head_dim], k and v [batch, keys,
  kv_heads, head_dim], by implementation. `causal`: query t sees keys <= t (self-attention
  of a decoder); `kv_lengths` (int32 [batch]): each row sees only its first kv_lengths
  keys (right-padded sources of an encoder-decoder). `bf16_operands` applies to "einsum"
  only. With a `prefix` (see einsum_attention) the attention is written out whatever the
  implementation."""
  if implementation == "einsum" or prefix is not None:
    mask = jnp.ones((1, q.shape[1], k.shape[1]), bool)  # [1, length, keys]
    if causal:
      mask = jnp.tril(mask)
    if kv_lengths is not None:  # -> [batch, length, keys]
      mask = mask & (jnp.arange(k.shape[1])[None, None, :] < kv_lengths[:, None, None])
    return einsum_attention(q, k, v, mask, bf16_operands, prefix=prefix)
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                      key_value_seq_lengths=kv_lengths,
                                      implementation=implementation)


def attend_cache(q, k, v, mask, bf16_operands: bool = False, prefix=None):
  """Masked attention over a cache, for every attention_impl: q [batch, length, heads,
  head_dim]; k, v in the cache layout [batch, kv_heads, slots, head_dim]; mask [batch,
  length, slots]. cuDNN's fused kernel takes causal/padding masks only, so the cache path
  is written out (jax.nn.dot_product_attention's "xla" path is the same two products).

  A one-token step (length 1) multiplies probabilities into V and sums over slots instead
  of a dot: XLA's CPU dot over [batch * kv_heads] tiny matrices ran at ~2 GB/s of cache
  read, 4x slower than the fused multiply-sum (SmolLM2-135M, batch 64, 288 slots).
  """
  if q.shape[1] != 1 or prefix is not None:
    return einsum_attention(q, k, v, mask, bf16_operands, kv_layout="bksd", prefix=prefix)
  batch, _, heads, head_dim = q.shape
  kv_heads, out_dtype = k.shape[1], q.dtype
  q = q.reshape(batch, 1, kv_heads, heads // kv_heads, head_dim)  # [b, 1, kv, group, d]
  if bf16_operands:  # k and v were rounded when written (_write); float32 sums
    q = q.astype(jnp.bfloat16)
  # (Spelled with the length axis: XLA then computes k @ q^T, which runs ~3x faster
  # here than q @ k^T.)
  scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores[:, :, :, 0] * head_dim**-0.5  # [b, kv, g, s]
  scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)  # mask [b, 1, s]
  probs = jax.nn.softmax(scores, axis=-1)
  if bf16_operands:
    probs = probs.astype(jnp.bfloat16)
  out = (probs[..., None].astype(jnp.float32) * v[:, :, None].astype(jnp.float32)).sum(axis=3)
  return out.astype(out_dtype).reshape(batch, 1, heads, head_dim)  # from [b, kv, g, d]


class SelfAttention(nn.Module):
  config: ModelConfig
  deterministic: bool = True
  # The cache holds nothing before this chunk, at positions 0..length-1 (Decoder's
  # empty_cache): attend over the chunk itself, causally.
  empty_cache: bool = False
  causal: bool = True  # False: an encoder's bidirectional attention (no cache)

  @nn.compact
  def __call__(self, x, positions, cache=None, slots=None, prefix=None, kv_lengths=None):
    """x: [batch, length, embed]; positions: int32 [batch, length].

    `slots` (int32 [batch, length], default `positions`): the cache slots of the tokens,
    which a soft prompt or prefix (`prefix`, see einsum_attention) puts `n` behind their
    positions, as it is kept out of the cache. `kv_lengths` (int32 [batch], without a
    cache): each row attends to its first kv_lengths tokens only (padding after them).
    Returns (out [batch, length, embed], updated cache or None).
    """
    slots = positions if slots is None else slots
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
    new_cache = None
    if cache is not None:
      start = slots[:, 0]  # [batch]; the chunk's slots are contiguous
      new_cache = {"k": _write(cache["k"], k, start, mixed),
                   "v": _write(cache["v"], v, start, mixed)}
    if cache is None or self.empty_cache:
      out = attend(q, k, v, implementation, bf16_operands=mixed, prefix=prefix,
                   causal=self.causal, kv_lengths=kv_lengths)
    else:
      cache_slots = jnp.arange(new_cache["k"].shape[2])  # [cache_length]
      mask = cache_slots[None, None, :] <= slots[:, :, None]  # [batch, length, cache_length]
      out = attend_cache(q, new_cache["k"].astype(q.dtype), new_cache["v"].astype(q.dtype),
                         mask, bf16_operands=mixed, prefix=prefix)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    out = layers.dense(cfg.width, ("heads", "kv", "embed"), cfg, layers.residual_std(cfg),
                       "out", deterministic=det)(out)  # [batch, length, embed]
    out = nn.Dropout(cfg.dropout)(out, deterministic=self.deterministic)
    return out, new_cache


def source_mask(source_lengths, source_len: int):
  """bool [batch, 1, source_len]: True on each row's first source_lengths positions."""
  return (jnp.arange(source_len)[None, :] < source_lengths[:, None])[:, None, :]


class CrossAttention(nn.Module):
  """A decoder's attention to the encoder's output (Vaswani et al., 2017, sec. 3.2.3).

  Queries come from the decoder stream, keys and values from the encoded source. Their
  projections of the source do not change while decoding, so a decode loop computes them
  once (`kv_only`) and passes them back as `kv` ({"k", "v"}: [batch, kv_heads,
  source_len, head_dim], the cache layout) at every step. No rotary positions: a source
  position and a target position are not on one axis.
  """
  config: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, encoded=None, source_lengths=None, kv=None, kv_only: bool = False):
    """x: [batch, length, embed] (unused with kv_only); encoded [batch, source_len, embed];
    source_lengths int32 [batch]. Returns out [batch, length, embed], or with kv_only the
    keys and values of `encoded`."""
    cfg = self.config
    bias, det = cfg.has_qkv_bias, self.deterministic
    if kv is None:
      k = layers.dense((cfg.kv_heads, cfg.head_dim), ("embed", "kv_heads", "kv"), cfg,
                       cfg.init_std, "key", bias, det)(encoded)  # [b, source, kv_heads, d]
      v = layers.dense((cfg.kv_heads, cfg.head_dim), ("embed", "kv_heads", "kv"), cfg,
                       cfg.init_std, "value", bias, det)(encoded)
      k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "kv"))
      v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "kv"))
      if kv_only:
        if layers.bf16_matmuls(cfg):  # stored rounded, as attend_cache reads them
          k, v = (a.astype(jnp.bfloat16).astype(a.dtype) for a in (k, v))
        return {"k": k.swapaxes(1, 2), "v": v.swapaxes(1, 2)}  # [b, kv_heads, source, d]
    q = layers.dense((cfg.num_heads, cfg.head_dim), ("embed", "heads", "kv"), cfg,
                     cfg.init_std, "query", bias, det)(x)  # [batch, length, heads, head_dim]
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    mixed = layers.bf16_matmuls(cfg)
    if kv is None:  # training and full forward passes: the fused attention where it runs
      implementation = resolve_implementation(cfg.attention_impl, q.dtype, cfg.head_dim)
      out = attend(q, k, v, implementation, bf16_operands=mixed, causal=False,
                   kv_lengths=source_lengths)
    else:  # decoding: the cached keys and values, every query seeing the whole source
      out = attend_cache(q, kv["k"].astype(q.dtype), kv["v"].astype(q.dtype),
                         source_mask(source_lengths, kv["k"].shape[2]),
                         bf16_operands=mixed)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    out = layers.dense(cfg.width, ("heads", "kv", "embed"), cfg, layers.residual_std(cfg),
                       "out", deterministic=det)(out)  # [batch, length, embed]
    return nn.Dropout(cfg.dropout)(out, deterministic=det)

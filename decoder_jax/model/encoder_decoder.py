"""The sequence-to-sequence Transformer (Vaswani et al., 2017): a bidirectional encoder
over the source and a decoder that attends to itself causally and to the encoder's
output through cross-attention.

Built from the decoder-only model's parts (attention.SelfAttention, layers.Mlp, the
family's norms and positions, the same logical axes), with config.encoder_layers encoder
blocks and config.num_layers decoder blocks. The decoder's token table is shared with the
encoder (a joint vocabulary) unless config.separate_source_embeddings, and tied to the
output layer with config.tie_embeddings. config.post_norm gives the original
norm(x + sublayer(x)) blocks; the default is pre-norm, x + sublayer(norm(x)), with a final
norm after each stack.

Decoding reaches the model as any decoder: the source is encoded once and every decoder
layer's cross-attention keys and values are computed once into the cache beside the
self-attention slots (`encode_only`); each step then runs the decoder alone.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from decoder_jax.model import attention, layers
from decoder_jax.model.config import ModelConfig
from decoder_jax.model.transformer import init_cache as init_self_cache


def _residual(config: ModelConfig, x, sublayer, norm_name: str):
  """x + sublayer(norm(x)) (pre-norm) or norm(x + sublayer(x)) (post-norm)."""
  if config.post_norm:
    return layers.norm(config, norm_name)(x + sublayer(x))
  return x + sublayer(layers.norm(config, norm_name)(x))


class EncoderBlock(nn.Module):
  """Bidirectional self-attention over the (right-padded) source, then the MLP."""
  config: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, positions, source_lengths):  # x: [batch, source_len, embed]
    cfg, det = self.config, self.deterministic
    attn = attention.SelfAttention(cfg, det, causal=False, name="attn")
    x = _residual(cfg, x, lambda h: attn(h, positions, kv_lengths=source_lengths)[0],
                  "attn_norm")
    x = _residual(cfg, x, layers.Mlp(cfg, det, name="mlp"), "mlp_norm")
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class DecoderBlock(nn.Module):
  """Causal self-attention (with the KV cache), cross-attention to the source, the MLP."""
  config: ModelConfig
  deterministic: bool = True
  empty_cache: bool = False  # see transformer.Decoder

  @nn.compact
  def __call__(self, x, positions, encoded, source_lengths, cache=None, cross_kv=None,
               kv_only: bool = False):
    """x: [batch, length, embed]; encoded [batch, source_len, embed] (None with
    `cross_kv`, the cached keys and values of cross-attention). -> (x, self cache);
    with `kv_only`, the cross-attention keys and values of `encoded` alone."""
    cfg, det = self.config, self.deterministic
    cross = attention.CrossAttention(cfg, det, name="cross_attn")
    if kv_only:
      return cross(None, encoded, kv_only=True)
    attn = attention.SelfAttention(cfg, det, self.empty_cache, name="attn")
    new_cache = None

    def self_attention(h):
      nonlocal new_cache
      out, new_cache = attn(h, positions, cache)
      return out

    x = _residual(cfg, x, self_attention, "attn_norm")
    x = _residual(cfg, x, lambda h: cross(h, encoded, source_lengths, kv=cross_kv),
                  "cross_norm")
    x = _residual(cfg, x, layers.Mlp(cfg, det, name="mlp"), "mlp_norm")
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), new_cache


class EncoderDecoder(nn.Module):
  """(source [batch, source_len], tokens [batch, length]) -> (logits [batch, length,
  vocab], cache or None).

  `source_lengths` (int32 [batch], default: the full width) marks each source row's real
  tokens; the rest is padding no query attends to. `tokens` are the decoder's inputs
  (the target shifted right behind a start token), at `positions` (default
  0..length-1).

  Training and full forward passes give `source`. Decoding calls the model once with
  `encode_only=True` (tokens unused) for the cache's source part: {"cross": per decoder
  layer {"k", "v"} [batch, kv_heads, source_len, head_dim], "source_lengths"}, the
  cross-attention keys and values computed once per source; then, with `source=None` and
  the whole cache (init_decoding_cache), the decoder alone, writing its keys and values
  at `positions` as transformer.Decoder does (`empty_cache`: a prefill from position 0).
  `return_hidden` returns the final decoder states [batch, length, embed] instead of
  logits (chunked losses).
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, source, tokens, source_lengths=None, positions=None, cache=None,
               deterministic: bool = True, return_hidden: bool = False,
               empty_cache: bool = False, encode_only: bool = False):
    cfg = self.config
    dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)

    def table(name):
      return nn.Embed(cfg.vocab_size, cfg.width, dtype=dtype, param_dtype=param_dtype,
                      embedding_init=layers.normal_init(cfg.init_std, ("vocab", "embed")),
                      name=name)

    def embedded(table_module, pos_name, ids):  # ids [batch, n] at 0..n-1 or `positions`
      at = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
      at = positions if pos_name == "decoder_pos_embed" and positions is not None else at
      x = table_module(ids)  # [batch, n, embed]
      if not cfg.use_rope:  # learned positions (gpt2 family), one table per stack
        pos_table = self.param(pos_name, layers.normal_init(cfg.init_std, ("length", "embed")),
                               (cfg.max_length, cfg.width), param_dtype)
        x = x + jnp.take(pos_table, at, axis=0).astype(x.dtype)
      x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
      return nn.with_logical_constraint(x, ("batch", "length", "embed")), at

    embed = table("embed")
    encoded = None
    if source is not None:
      batch, source_len = source.shape
      if source_lengths is None:
        source_lengths = jnp.full((batch,), source_len, jnp.int32)
      source_embed = table("source_embed") if cfg.separate_source_embeddings else embed
      x, source_positions = embedded(source_embed, "encoder_pos_embed", source)
      for i in range(cfg.encoder_layers):
        x = EncoderBlock(cfg, deterministic, name=f"encoder_block_{i}")(
            x, source_positions, source_lengths)
      encoded = x if cfg.post_norm else layers.norm(cfg, "encoder_norm")(x)
    blocks = [DecoderBlock(cfg, deterministic, empty_cache, name=f"decoder_block_{i}")
              for i in range(cfg.num_layers)]
    if encode_only:
      if encoded is None:
        raise ValueError("encode_only needs the source")
      return {"cross": [block(None, None, encoded, None, kv_only=True) for block in blocks],
              "source_lengths": source_lengths.astype(jnp.int32)}
    if encoded is None:
      if cache is None or "cross" not in cache:
        raise ValueError("EncoderDecoder needs a source, or a cache holding the encoded one "
                         "(encode_only=True, then init_decoding_cache)")
      source_lengths = cache["source_lengths"]
    x, positions = embedded(embed, "decoder_pos_embed", tokens)
    new_layers = []
    for i, block in enumerate(blocks):
      x, layer_cache = block(x, positions, encoded, source_lengths,
                             None if cache is None else cache["layers"][i],
                             None if encoded is not None else cache["cross"][i])
      new_layers.append(layer_cache)
    if not cfg.post_norm:
      x = layers.norm(cfg, "decoder_norm")(x)
    new_cache = None if cache is None else {**cache, "layers": new_layers}
    if return_hidden:
      return x, new_cache
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = layers.dense(cfg.vocab_size, ("embed", "vocab"), cfg, cfg.init_std, "lm_head",
                            use_bias=False, deterministic=deterministic)(x)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab")), new_cache


def init_decoding_cache(config: ModelConfig, source_part: dict, length: int, dtype) -> dict:
  """The decoder's empty self-attention cache for `length` target positions beside the
  encoded source (`source_part`, from encode_only=True): every leaf [batch, ...]."""
  batch = source_part["source_lengths"].shape[0]
  return {**init_self_cache(config, batch, length, dtype), **source_part}

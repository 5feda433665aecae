"""Pure Flax (linen) model code: no optimizer, no I/O, no globals."""

import jax.numpy as jnp

from decoder_jax.model.config import ModelConfig, preset
from decoder_jax.model.encoder_decoder import EncoderDecoder
from decoder_jax.model.transformer import Decoder, init_cache, relayout_layers, resize_cache


def build(config: ModelConfig, num_labels: int = 0):
  """The module a config describes: an EncoderDecoder (config.encoder_layers > 0) or the
  decoder-only Decoder (with a classification head of `num_labels` classes)."""
  if config.is_encoder_decoder:
    return EncoderDecoder(config)
  return Decoder(config, num_labels=num_labels)


def init_inputs(config: ModelConfig, length: int = 8) -> tuple:
  """Positional inputs for `build(config).init`: (tokens,) or (source, tokens), [1, length]."""
  tokens = jnp.zeros((1, length), jnp.int32)
  return (tokens, tokens) if config.is_encoder_decoder else (tokens,)


__all__ = ["ModelConfig", "preset", "Decoder", "EncoderDecoder", "build", "init_inputs",
           "init_cache", "relayout_layers", "resize_cache"]

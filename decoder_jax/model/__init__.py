"""Pure Flax (linen) model code: no optimizer, no I/O, no globals."""

from decoder_jax.model.config import ModelConfig, preset
from decoder_jax.model.transformer import Decoder, init_cache, relayout_layers, resize_cache

__all__ = ["ModelConfig", "preset", "Decoder", "init_cache", "relayout_layers",
           "resize_cache"]

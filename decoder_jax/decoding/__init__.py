"""Autoregressive decoding against a `tokens_to_logits` callback; never imports model code."""

from decoder_jax.decoding.samplers import Greedy, Temperature, TopK, make_sampler
from decoder_jax.decoding.loop import DecodeState, DecodeResult, generate

__all__ = ["Greedy", "Temperature", "TopK", "make_sampler", "DecodeState", "DecodeResult",
           "generate"]

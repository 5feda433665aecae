"""Autoregressive decoding against a `tokens_to_logits` callback; never imports model code."""

from decoder_jax.decoding.samplers import Greedy, Temperature, TopK, TopP, make_sampler
from decoder_jax.decoding.loop import DecodeState, DecodeResult, generate
from decoder_jax.decoding.scoring import continuation_logprobs
from decoder_jax.decoding.beam_search import BeamResult, beam_search
from decoder_jax.decoding.speculative import SpeculativeResult, speculative_generate

__all__ = ["Greedy", "Temperature", "TopK", "TopP", "make_sampler", "DecodeState", "DecodeResult",
           "generate", "continuation_logprobs", "BeamResult", "beam_search", "SpeculativeResult",
           "speculative_generate"]

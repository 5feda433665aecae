"""Decoding an encoder-decoder (model/encoder_decoder.py) with the decoder-only engine.

The source is encoded once per batch and each decoder layer's cross-attention keys and
values are computed once into the cache beside the empty self-attention slots; the
decoder's prompt is the start token alone. decoding.generate and decoding.beam_search
then run their usual `lax.while_loop`, reaching the model only through
tokens_to_logits(tokens, positions, cache): every cache leaf has its rows on axis 0,
so sampling rows and beam reordering copy the source part with the rest.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from decoder_jax import decoding, inference
from decoder_jax.errors import ConfigError
from decoder_jax.model import ModelConfig, layers
from decoder_jax.model.encoder_decoder import EncoderDecoder, init_decoding_cache


def _decoding_setup(model_config: ModelConfig, params, source, source_lengths,
                    max_new_tokens: int, bos_id: int):
  """(tokens_to_logits, prefill_to_logits, cache, prompts [batch, 1], prompt lengths)."""
  model = EncoderDecoder(model_config)
  params = layers.round_matmul_kernels(params, model_config)  # once, before the loop
  source_part = model.apply({"params": params}, source, None, source_lengths=source_lengths,
                            encode_only=True)
  # The start token sits at position 0; generated tokens fill positions 1..max_new_tokens.
  cache = init_decoding_cache(model_config, source_part, 1 + max_new_tokens,
                              jnp.dtype(model_config.dtype))
  batch = source.shape[0]
  prompts = jnp.full((batch, 1), bos_id, jnp.int32)
  prompt_lengths = jnp.ones((batch,), jnp.int32)

  def tokens_to_logits(tokens, positions, cache):
    return model.apply({"params": params}, None, tokens, positions=positions, cache=cache)

  def prefill_to_logits(tokens, positions, cache, last):  # the one start token per row
    del positions, last
    logits, cache = model.apply({"params": params}, None, tokens, cache=cache,
                                empty_cache=True)
    return logits[:, -1], cache

  return tokens_to_logits, prefill_to_logits, cache, prompts, prompt_lengths


@functools.partial(jax.jit, static_argnames=("model_config", "max_new_tokens", "sampler",
                                             "bos_id", "eos_id"))
def generate_tokens(params, source, source_lengths, rng, *, model_config: ModelConfig,
                    max_new_tokens: int, sampler, bos_id: int,
                    eos_id: int | None = None) -> decoding.DecodeResult:
  """Samples a target after each right-padded source [batch, source_len] (source_lengths
  int32 [batch]): one program, greedy with decoding.Greedy()."""
  to_logits, prefill_fn, cache, prompts, lengths = _decoding_setup(
      model_config, params, source, source_lengths, max_new_tokens, bos_id)
  return decoding.generate(to_logits, cache, prompts, lengths, max_new_tokens=max_new_tokens,
                           sampler=sampler, rng=rng, eos_id=eos_id, pad_id=0,
                           prefill_to_logits=prefill_fn)


@functools.partial(jax.jit, static_argnames=("model_config", "num_beams", "max_new_tokens",
                                             "length_penalty", "bos_id", "eos_id"))
def beam_search_tokens(params, source, source_lengths, *, model_config: ModelConfig,
                       num_beams: int, max_new_tokens: int, bos_id: int,
                       eos_id: int | None = None, length_penalty: float = 1.0):
  """Beam search after each source: decoding.BeamResult, the beams best first."""
  to_logits, prefill_fn, cache, prompts, lengths = _decoding_setup(
      model_config, params, source, source_lengths, max_new_tokens, bos_id)
  return decoding.beam_search(to_logits, cache, prompts, lengths, num_beams=num_beams,
                              max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                              eos_id=eos_id, prefill_to_logits=prefill_fn)


def check_tokenizer(tokenizer) -> tuple[int, int]:
  """(bos_id, eos_id) of a seq2seq vocabulary: the decoder starts from bos and stops at eos."""
  bos, eos = getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)
  if bos is None or eos is None or bos < 0 or eos < 0:
    raise ConfigError("an encoder-decoder decodes from a start token to an end token: the "
                      f"tokenizer has bos_id={bos}, eos_id={eos}")
  return bos, eos


def translate_ids(trained: inference.TrainedModel, source_ids: Sequence[Sequence[int]], *,
                  max_new_tokens: int, num_beams: int = 1, batch_size: int = 32,
                  length_penalty: float = 1.0, sampler=None, seed: int = 0) -> list[list[int]]:
  """The target ids of each source (greedy, sampled with `sampler`, or the best of
  `num_beams` beams), without the end token.

  Sources are decoded in chunks of `batch_size` rows (the last padded with copies of a
  one-token source) at power-of-two widths, so an evaluation set compiles a few programs.
  """
  if num_beams < 1 or max_new_tokens < 1 or batch_size < 1:
    raise ConfigError(f"num_beams, max_new_tokens and batch_size must be >= 1, got "
                      f"{num_beams}, {max_new_tokens}, {batch_size}")
  bos, eos = check_tokenizer(trained.tokenizer)
  config, params = trained.config, trained.params
  limit = config.max_length if not config.use_rope else None
  if limit is not None and max_new_tokens + 1 > limit:
    raise ConfigError(f"max_new_tokens={max_new_tokens} does not fit the decoder's "
                      f"max_length={limit} (one position holds the start token)")
  sampler = sampler or decoding.Greedy()
  order = np.argsort([len(s) for s in source_ids], kind="stable")  # similar widths together
  out: list[list[int] | None] = [None] * len(source_ids)
  rng = jax.random.key(seed)
  for start in range(0, len(order), batch_size):
    chunk = [list(source_ids[i]) for i in order[start:start + batch_size]]
    if any(not ids for ids in chunk):
      raise ConfigError("a source encodes to no tokens")
    if limit is not None:
      chunk = [ids[:limit] for ids in chunk]  # the encoder's positions end at max_length
    rows = len(chunk)
    chunk += [chunk[0][:1]] * (batch_size - rows)
    source, lengths = inference.pad_prompts(chunk, max_width=limit)
    if num_beams > 1:
      result = beam_search_tokens(params, source, lengths, model_config=config,
                                  num_beams=num_beams, max_new_tokens=max_new_tokens,
                                  bos_id=bos, eos_id=eos, length_penalty=length_penalty)
      tokens = np.asarray(result.tokens[:, 0])  # [batch, max_new_tokens], the best beam
      counts = np.asarray(result.lengths[:, 0])
    else:
      rng, step_rng = jax.random.split(rng)
      result = generate_tokens(params, source, lengths, step_rng, model_config=config,
                               max_new_tokens=max_new_tokens, sampler=sampler, bos_id=bos,
                               eos_id=eos)
      tokens, counts = np.asarray(result.tokens), np.asarray(result.lengths)
    for row in range(rows):
      ids = tokens[row, :counts[row]].tolist()
      out[order[start + row]] = ids[:-1] if ids and ids[-1] == eos else ids
  return out


def translate_texts(trained: inference.TrainedModel, sources: Sequence[str], **kw) -> list[str]:
  """Each source sentence's translation as text (translate_ids' settings)."""
  tokenizer = trained.tokenizer
  _, eos = check_tokenizer(tokenizer)
  ids = [list(tokenizer.encode(text)) + [eos] for text in sources]
  return [tokenizer.decode(t).strip() for t in translate_ids(trained, ids, **kw)]

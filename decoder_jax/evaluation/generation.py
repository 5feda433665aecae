"""Batched generation for evaluation: prompts as token ids in, texts out, greedy or beam.

Every chunk is padded to the same number of rows and to a power-of-two prompt width, so a
whole evaluation set compiles one program per prompt bucket, not one per chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from decoder_jax import decoding, inference, progress


def generate_texts(trained: inference.TrainedModel, prompt_ids: Sequence[Sequence[int]], *,
                   max_new_tokens: int, num_beams: int = 1, batch_size: int = 32,
                   length_penalty: float = 1.0) -> list[str]:
  """The text each prompt continues with (greedy, or the best of `num_beams` beams), up to
  the first end-of-sequence token of the tokenizer, which is not included."""
  if not prompt_ids:
    return []
  tokenizer, config = trained.tokenizer, trained.config
  ends = inference.end_ids(tokenizer)
  eos_id = ends[0] if ends else None
  stop = np.asarray([ends[1:] or [-1]], np.int32)  # [1, n]; -1 never matches a token
  for ids in prompt_ids:
    inference.check_request(config, len(ids), max_new_tokens, num_beams=num_beams)
  texts: list[str] = []
  how = f"beam search ({num_beams} beams)" if num_beams > 1 else "greedy decoding"
  shown = progress.Progress(how, len(prompt_ids), unit="prompts")
  for first in range(0, len(prompt_ids), batch_size):
    chunk = list(prompt_ids[first:first + batch_size])
    rows = len(chunk)
    chunk += [chunk[-1]] * (batch_size - rows)  # the same shape for every chunk
    prompts, lengths = inference.pad_prompts(chunk, max_width=config.max_length - max_new_tokens)
    if num_beams > 1:
      result = inference.beam_search_tokens(
          trained.params, prompts, lengths, model_config=config, num_beams=num_beams,
          max_new_tokens=max_new_tokens, length_penalty=length_penalty, eos_id=eos_id)
      tokens = np.asarray(result.tokens)[:, 0]  # best beam: [batch, max_new_tokens]
      out_lengths = np.asarray(result.lengths)[:, 0]
    else:
      result = inference.generate_tokens(
          trained.params, prompts, lengths, jax.random.key(0), np.repeat(stop, batch_size, 0),
          model_config=config, max_new_tokens=max_new_tokens, sampler=decoding.Greedy(),
          eos_id=eos_id)
      tokens, out_lengths = np.asarray(result.tokens), np.asarray(result.lengths)
    for row in range(rows):
      ids = tokens[row, :out_lengths[row]].tolist()
      if ids and ids[-1] in ends:
        ids = ids[:-1]
      texts.append(tokenizer.decode(ids, **_skip_special(tokenizer)).strip())
    shown.update(rows)
  shown.close()
  return texts


def _skip_special(tokenizer) -> dict:
  """HF tokenizers keep special tokens in decode() unless asked; references have none."""
  try:
    tokenizer.decode([], skip_special_tokens=True)
    return {"skip_special_tokens": True}
  except TypeError:
    return {}

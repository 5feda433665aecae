"""Batched generation for evaluation: prompts as token ids in, texts out, greedy or beam.

Every chunk is padded to the same number of rows and to a power-of-two prompt width, so a
whole evaluation set compiles one program per prompt bucket, not one per chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

from decoder_jax import decoding, inference


def generate_texts(trained: inference.TrainedModel, prompt_ids: Sequence[Sequence[int]], *,
                   max_new_tokens: int, num_beams: int = 1, batch_size: int = 32,
                   length_penalty: float = 1.0) -> list[str]:
  """The text each prompt continues with (greedy, or the best of `num_beams` beams), up to
  the first end-of-sequence token of the tokenizer, which is not included."""
  if not prompt_ids:
    return []
  tokenizer = trained.tokenizer
  ends = inference.end_ids(tokenizer)
  per_prompt = inference.generate_ids(
      trained, prompt_ids, max_new_tokens=max_new_tokens, sampler=decoding.Greedy(),
      num_beams=num_beams, stop_ids=ends[1:], eos_id=ends[0] if ends else None,
      length_penalty=length_penalty, batch_size=batch_size)
  texts: list[str] = []
  for candidates in per_prompt:
    best = candidates[0]  # the one greedy sample, or the best beam
    ids = best.tokens[:best.length].tolist()
    if ids and ids[-1] in ends:
      ids = ids[:-1]
    texts.append(tokenizer.decode(ids, **_skip_special(tokenizer)).strip())
  return texts


def _skip_special(tokenizer) -> dict:
  """HF tokenizers keep special tokens in decode() unless asked; references have none."""
  try:
    tokenizer.decode([], skip_special_tokens=True)
    return {"skip_special_tokens": True}
  except TypeError:
    return {}

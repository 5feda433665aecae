"""One decode call for the batcher: `inference.generate_batch` over a batch's rows.

Each row draws with its own request's seed, so a reply does not depend on what else
shares its call: requests are batched by their settings alone (`batch_key`). The rows
are padded (with copies of the last) to a power of two, at most max_batch, so a server
compiles one program per batch size bucket, not one per number of requests that
happened to arrive together; the copies' tokens and results are dropped.
"""

from __future__ import annotations

from decoder_jax import inference
from decoder_jax.serving.protocol import DecodeSettings, Job


def batch_key(job: Job) -> DecodeSettings:
  """What requests must share to be decoded in one call."""
  return job.settings


def padded_size(rows: int, max_batch: int) -> int:
  return min(max_batch, 1 << max(0, rows - 1).bit_length())


def make_decode(trained, max_batch: int):
  """decode(settings, rows, seeds, on_token) -> per row {"text", "tokens", "finish_reason"}."""

  def decode(settings: DecodeSettings, rows: list, seeds: list[int],
             on_token=None) -> list[dict]:
    count = len(rows)
    width = max(count, padded_size(count, max_batch))

    def listen(row: int, token: int) -> None:
      if row < count:  # not a padding copy
        on_token(row, token)

    outputs = inference.generate_batch(
        trained, rows + [rows[-1]] * (width - count), max_new_tokens=settings.max_tokens,
        sampler=settings.sampler, seed=seeds + [seeds[-1]] * (width - count),
        stop=settings.stop, chat=settings.chat, batch_size=width,
        # A streamed call compiles a program of its own: only when a request listens.
        on_token=None if on_token is None else listen)
    samples = [output["samples"][0] for output in outputs[:count]]
    return [{"text": s["text"], "tokens": list(s["tokens"]),
             "finish_reason": s["finish_reason"]} for s in samples]

  return decode

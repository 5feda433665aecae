"""Log-likelihood of given continuations: one full forward pass, no sampling."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def continuation_logprobs(logits_fn: Callable, tokens, prompt_lengths, total_lengths):
  """Sum of log p(token_t | tokens_<t) over each row's continuation.

  tokens: int32 [batch, length], prompt then continuation, right-padded;
  prompt_lengths / total_lengths: int32 [batch]; the continuation is
  tokens[prompt_length:total_length]. logits_fn(tokens) -> logits [batch, length, vocab].
  Returns (sum float32 [batch], per-token float32 [batch, length - 1], 0 outside the span).
  """
  logits = logits_fn(tokens).astype(jnp.float32)  # [batch, length, vocab]
  logprobs = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # predicts tokens[:, 1:]
  picked = jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]  # [batch, length-1]
  target_index = jnp.arange(1, tokens.shape[1])[None, :]  # position of each predicted token
  in_span = (target_index >= prompt_lengths[:, None]) & (target_index < total_lengths[:, None])
  per_token = jnp.where(in_span, picked, 0.0)
  return per_token.sum(axis=1), per_token

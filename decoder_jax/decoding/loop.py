"""generate(): prefill the prompts into a static KV cache, then one token per
`lax.while_loop` iteration until every row has stopped or the budget is spent.

The model is reached only through

    tokens_to_logits(tokens [batch, T], positions [batch, T], cache) -> (logits [batch, T, vocab], cache)

so this module works for any decoder whose cache is a pytree of static shape.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class DecodeState:
  step: jax.Array  # int32 []: tokens generated so far (the same for every row)
  last_token: jax.Array  # int32 [batch]: the token to feed next
  position: jax.Array  # int32 [batch]: the position of last_token
  generated: jax.Array  # int32 [batch, max_new_tokens]: output, pad_id after a row stops
  done: jax.Array  # bool [batch]: the row has emitted eos
  cache: Any  # the callback's KV cache pytree
  rng: jax.Array  # PRNG key


@struct.dataclass
class DecodeResult:
  tokens: jax.Array  # int32 [batch, max_new_tokens], pad_id after each row's end
  lengths: jax.Array  # int32 [batch]: generated tokens per row (eos included)


def generate(tokens_to_logits: Callable, cache, prompts, prompt_lengths, *, max_new_tokens: int,
             sampler, rng, eos_id: int | None = None, pad_id: int = 0) -> DecodeResult:
  """Decodes `max_new_tokens` after each prompt. Call it under jax.jit.

  prompts: int32 [batch, prompt_len], right-padded; prompt_lengths: int32 [batch] (>= 1).
  cache: an empty cache with room for prompt_len + max_new_tokens positions.
  Each row continues from its own length, so a ragged batch decodes as each row alone.
  """
  batch, prompt_len = prompts.shape
  positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
  logits, cache = tokens_to_logits(prompts, positions, cache)  # [batch, prompt_len, vocab]
  last = prompt_lengths - 1  # [batch]
  last_logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]  # [batch, vocab]
  rng, first_rng = jax.random.split(rng)
  first = sampler(last_logits, first_rng)  # [batch]
  done = jnp.zeros((batch,), bool) if eos_id is None else first == eos_id
  generated = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  state = DecodeState(step=jnp.array(1, jnp.int32), last_token=first,
                      position=prompt_lengths.astype(jnp.int32), generated=generated, done=done,
                      cache=cache, rng=rng)

  def cond(s: DecodeState):
    return (s.step < max_new_tokens) & ~jnp.all(s.done)

  def body(s: DecodeState):
    logits, cache = tokens_to_logits(s.last_token[:, None], s.position[:, None], s.cache)
    rng, step_rng = jax.random.split(s.rng)
    token = sampler(logits[:, 0], step_rng)  # [batch]
    token = jnp.where(s.done, pad_id, token)
    generated = jax.lax.dynamic_update_slice(s.generated, token[:, None], (0, s.step))
    done = s.done if eos_id is None else s.done | (token == eos_id)
    return DecodeState(step=s.step + 1, last_token=token, position=s.position + 1,
                       generated=generated, done=done, cache=cache, rng=rng)

  state = jax.lax.while_loop(cond, body, state)
  if eos_id is None:
    lengths = jnp.full((batch,), state.step, jnp.int32)
  else:
    is_eos = state.generated == eos_id
    first_eos = jnp.argmax(is_eos, axis=1)
    lengths = jnp.where(is_eos.any(axis=1), first_eos + 1, state.step).astype(jnp.int32)
  return DecodeResult(tokens=state.generated, lengths=lengths)

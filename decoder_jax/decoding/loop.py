"""generate(): prefill the prompts into a static KV cache, then one token per
`lax.while_loop` iteration until every row has stopped or the budget is spent.

The model is reached only through

    tokens_to_logits(tokens [batch, T], positions [batch, T], cache) -> (logits [batch, T, vocab], cache)

so this module works for any decoder whose cache is a pytree of static shape. A model
that can apply its output layer at one position per row may also pass

    prefill_to_logits(prompts [batch, T], positions [batch, T], cache, last [batch])
        -> (logits at each row's position `last` [batch, vocab], cache)

which spares the [batch, T, vocab] logits of the prompt (the prefill's largest product),
and a model whose cache works at any number of slots may pass `cache_block` with

    resize_cache(cache, slots) -> the cache with `slots` slots (cut or zero-padded)

to decode with a cache that grows `cache_block` slots at a time (see generate).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from decoder_jax.errors import ConfigError


@struct.dataclass
class DecodeState:
  step: jax.Array  # int32 []: tokens generated so far (the same for every row)
  last_token: jax.Array  # int32 [batch]: the token to feed next
  position: jax.Array  # int32 [batch]: the position of last_token
  generated: jax.Array  # int32 [batch, max_new_tokens]: output, pad_id after a row stops
  logprobs: jax.Array  # float32 [batch, max_new_tokens]: model log-probability of each token
  done: jax.Array  # bool [batch]: the row has emitted one of its stop tokens
  cache: Any  # the callback's KV cache pytree
  rng: jax.Array  # PRNG key


@struct.dataclass
class DecodeResult:
  tokens: jax.Array  # int32 [batch, max_new_tokens], pad_id after each row's end
  lengths: jax.Array  # int32 [batch]: generated tokens per row (the stop token included)
  logprobs: jax.Array  # float32 [batch, max_new_tokens]: log p(token | prefix), 0 after the end


def stop_table(batch: int, eos_id: int | None, stop_ids=None):
  """int32 [batch, num_stop] of stop tokens per row; -1 marks an unused slot."""
  columns = []
  if eos_id is not None:
    columns.append(jnp.full((batch, 1), eos_id, jnp.int32))
  if stop_ids is not None:
    columns.append(jnp.asarray(stop_ids, jnp.int32).reshape(batch, -1))
  if not columns:
    return jnp.full((batch, 1), -1, jnp.int32)
  return jnp.concatenate(columns, axis=1)


def mask_stop_tokens(logits, stops):
  """-inf on each row's stop tokens: logits [batch, vocab], stops [batch, num_stop]."""
  vocab = logits.shape[-1]
  rows = jnp.arange(logits.shape[0])[:, None]
  # -1 (unused) becomes an out-of-range index, which mode="drop" ignores.
  is_stop = jnp.zeros(logits.shape, bool).at[rows, jnp.where(stops < 0, vocab, stops)].set(
      True, mode="drop")
  return jnp.where(is_stop, -jnp.inf, logits)


def prefill(tokens_to_logits: Callable, cache, prompts, prompt_lengths,
            prefill_to_logits: Callable | None = None):
  """Runs right-padded prompts [batch, T] into the cache: (logits of each row's last
  prompt token [batch, vocab], cache)."""
  batch, prompt_len = prompts.shape
  positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
  last = (prompt_lengths - 1).astype(jnp.int32)  # [batch]
  if prefill_to_logits is not None:
    return prefill_to_logits(prompts, positions, cache, last)
  logits, cache = tokens_to_logits(prompts, positions, cache)  # [batch, T, vocab]
  return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0], cache


def cache_stages(prompt_len: int, total: int, block: int) -> list[int]:
  """Slot counts of a cache grown `block` slots at a time, up to `total`: the first holds
  the prompt and the next token; each stage serves the steps whose positions fit in it."""
  if block < 1:
    raise ValueError(f"cache_block must be >= 1, got {block}")
  first = min(total, -(-(prompt_len + 1) // block) * block)
  return list(range(first, total, block)) + [total]


def first_stage(cache, prompt_len: int, max_new_tokens: int, cache_block: int | None,
                resize_cache: Callable | None):
  """(stages, the cache cut to the first): stages [None] (one loop over the cache as
  given) without cache_block."""
  if cache_block is None:
    return [None], cache
  if resize_cache is None:
    raise ValueError("cache_block needs resize_cache (how to cut or grow the cache)")
  stages = cache_stages(prompt_len, prompt_len + max_new_tokens, cache_block)
  return stages, resize_cache(cache, stages[0])


def staged_while_loop(cond: Callable, body: Callable, state, stages, resize_cache,
                      next_slot: Callable):
  """lax.while_loop(cond, body, state) run as one loop per stage: stage `slots` runs while
  next_slot(state), the highest cache slot the next step writes, is below `slots`; the
  cache (state.cache) grows between stages."""
  for i, slots in enumerate(stages):
    stage_cond = cond
    if slots is not None:
      stage_cond = lambda s, slots=slots: cond(s) & (next_slot(s) < slots)
    if i:
      state = state.replace(cache=resize_cache(state.cache, slots))
    state = jax.lax.while_loop(stage_cond, body, state)
  return state


def generate(tokens_to_logits: Callable, cache, prompts, prompt_lengths, *, max_new_tokens: int,
             sampler, rng, eos_id: int | None = None, stop_ids=None, min_new_tokens: int = 0,
             pad_id: int = 0, prefill_to_logits: Callable | None = None,
             cache_block: int | None = None,
             resize_cache: Callable | None = None) -> DecodeResult:
  """Decodes up to `max_new_tokens` after each prompt. Call it under jax.jit.

  prompts: int32 [batch, prompt_len], right-padded; prompt_lengths: int32 [batch] (>= 1).
  cache: an empty cache with room for prompt_len + max_new_tokens positions.
  stop_ids: optional int32 [batch, num_stop] extra stop tokens per row (-1 = none); a row
  stops after emitting eos_id or one of its stop tokens, but not before min_new_tokens.
  Each row continues from its own length, so a ragged batch decodes as each row alone.

  cache_block (with resize_cache): a step reads every slot of the cache, so instead of one
  loop over a full-length cache, run one loop per stage of cache_stages(prompt_len,
  prompt_len + max_new_tokens, cache_block), growing the cache between stages: the
  same tokens, with each step reading about as many slots as positions are filled
  (one loop body compiled per stage).
  """
  if max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if not 0 <= min_new_tokens <= max_new_tokens:
    raise ConfigError(f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], "
                      f"got {min_new_tokens}")
  batch = prompts.shape[0]
  stops = stop_table(batch, eos_id, stop_ids)  # [batch, num_stop]

  def choose(logits, step_rng, step, done):
    """Samples the token at `step` for rows not done: (token, logprob, done) each [batch]."""
    logits = logits.astype(jnp.float32)
    logits = jnp.where(step < min_new_tokens, mask_stop_tokens(logits, stops), logits)
    token = sampler(logits, step_rng)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=1)[:, 0]
    token = jnp.where(done, pad_id, token)
    logprob = jnp.where(done, 0.0, logprob)
    done = done | jnp.any(token[:, None] == stops, axis=1)
    return token, logprob, done

  stages, cache = first_stage(cache, prompts.shape[1], max_new_tokens, cache_block,
                              resize_cache)
  last_logits, cache = prefill(tokens_to_logits, cache, prompts, prompt_lengths,
                               prefill_to_logits)  # [batch, vocab]
  rng, first_rng = jax.random.split(rng)
  first, first_logprob, done = choose(last_logits, first_rng, 0, jnp.zeros((batch,), bool))
  state = DecodeState(
      step=jnp.array(1, jnp.int32), last_token=first,
      position=prompt_lengths.astype(jnp.int32),
      generated=jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first),
      logprobs=jnp.zeros((batch, max_new_tokens), jnp.float32).at[:, 0].set(first_logprob),
      done=done, cache=cache, rng=rng)

  def cond(s: DecodeState):
    return (s.step < max_new_tokens) & ~jnp.all(s.done)

  def body(s: DecodeState):
    logits, cache = tokens_to_logits(s.last_token[:, None], s.position[:, None], s.cache)
    rng, step_rng = jax.random.split(s.rng)
    token, logprob, done = choose(logits[:, 0], step_rng, s.step, s.done)
    return DecodeState(
        step=s.step + 1, last_token=token, position=s.position + 1,
        generated=jax.lax.dynamic_update_slice(s.generated, token[:, None], (0, s.step)),
        logprobs=jax.lax.dynamic_update_slice(s.logprobs, logprob[:, None], (0, s.step)),
        done=done, cache=cache, rng=rng)

  # The next step writes slot `position` of each row.
  state = staged_while_loop(cond, body, state, stages, resize_cache,
                            lambda s: jnp.max(s.position))
  # A row's length: up to and including its first stop token, else every step taken.
  is_stop = jnp.any(state.generated[:, :, None] == stops[:, None, :], axis=2)  # [batch, max_new]
  first_stop = jnp.argmax(is_stop, axis=1)
  lengths = jnp.where(is_stop.any(axis=1), first_stop + 1, state.step).astype(jnp.int32)
  return DecodeResult(tokens=state.generated, lengths=lengths, logprobs=state.logprobs)

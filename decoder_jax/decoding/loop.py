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

from decoder_jax.decoding import stop_strings as stop_strings_lib
from decoder_jax.errors import ConfigError


@struct.dataclass
class DecodeState:
  step: jax.Array  # int32 []: loop iterations so far (tokens of the longest row)
  last_token: jax.Array  # int32 [rows]: the token to feed next
  position: jax.Array  # int32 [rows]: the position of last_token (frozen once a row is done)
  generated: jax.Array  # int32 [rows, max_new_tokens]: output, pad_id after a row stops
  logprobs: jax.Array  # float32 [rows, max_new_tokens]: model log-probability of each token
  count: jax.Array  # int32 [rows]: tokens emitted by each row
  done: jax.Array  # bool [rows]: the row has stopped or spent its budget
  stopped: jax.Array  # bool [rows]: the row emitted a stop token or completed a stop string
  stop_state: Any  # int32 [rows, num_strings] stop-string automaton states, or None
  cache: Any  # the callback's KV cache pytree
  rng: jax.Array  # PRNG key, or keys [rows] (each row sampling with its own)


@struct.dataclass
class DecodeResult:
  tokens: jax.Array  # int32 [rows, max_new_tokens], pad_id after each row's end
  lengths: jax.Array  # int32 [rows]: generated tokens per row (the stop token included)
  logprobs: jax.Array  # float32 [rows, max_new_tokens]: log p(token | prefix), 0 after the end
  stopped: jax.Array = None  # bool [rows]: ended on a stop token or stop string (not length)
  stop_state: Any = None  # int32 [rows, num_strings]: where each row's stop strings stand


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


def sample_rows(sampler, logits, rng):
  """sampler over logits [rows, vocab] with one key (the batch sampled together) or keys
  [rows] (each row alone, as if in a batch of one: its sample does not depend on the
  other rows)."""
  if jnp.ndim(rng) == 0:
    return sampler(logits, rng)
  return jax.vmap(lambda row_logits, key: sampler(row_logits[None], key)[0])(logits, rng)


def split_rng(rng):
  """(carried, this step's) keys from a key or keys [rows]."""
  if jnp.ndim(rng) == 0:
    return tuple(jax.random.split(rng))
  pairs = jax.vmap(jax.random.split)(rng)  # [rows, 2]
  return pairs[:, 0], pairs[:, 1]


def repeat_rows(tree, times: int, axis: int = 0):
  """Every row of every leaf repeated `times` times in place (row b -> rows b*times..)."""
  if times == 1:
    return tree
  return jax.tree.map(lambda x: jnp.repeat(x, times, axis=axis), tree)


def generate(tokens_to_logits: Callable, cache, prompts, prompt_lengths, *, max_new_tokens: int,
             sampler, rng, eos_id: int | None = None, stop_ids=None, min_new_tokens=0,
             pad_id: int = 0, prefill_to_logits: Callable | None = None,
             cache_block: int | None = None, resize_cache: Callable | None = None,
             num_samples: int = 1, cache_batch_axis: int = 0, budgets=None,
             stop_strings=None, stop_state=None,
             on_step: Callable | None = None, on_step_args=()) -> DecodeResult:
  """Decodes up to `max_new_tokens` after each prompt. Call it under jax.jit.

  prompts: int32 [batch, prompt_len], right-padded; prompt_lengths: int32 [batch] (>= 1).
  cache: an empty cache for `batch` rows with room for prompt_len + max_new_tokens
  positions (or for the highest position a row reaches: prompt length + budget).
  num_samples: each prompt is prefilled once and its cache rows copied to `num_samples`
  rows (row b * num_samples + j is sample j of prompt b): rows = batch * num_samples, and
  every per-row argument below has `rows` rows. The cache's batch axis is
  `cache_batch_axis` (1 for caches stacked over layers).
  rng: one key, or keys [rows] with which each row samples alone (sample_rows).
  stop_ids: optional int32 [rows or 1, num_stop] extra stop tokens per row (-1 = none); a
  row stops after emitting eos_id or one of its stop tokens, but not before
  min_new_tokens (an int or int32 [rows]) tokens.
  budgets: optional int32 [rows]: a row stops after this many tokens (<= max_new_tokens;
  0: the row is done from the start).
  stop_strings (a stop_strings.StopStringTable) with stop_state (int32 [rows, strings],
  default all zeros): a row also stops on the token that completes one of the strings in
  the text of its tokens after the first min_new_tokens. The final states come back in
  the result, so a following call can continue them.
  on_step: a host function on_step(step, tokens [rows], emitted bool [rows],
  *on_step_args) called in order as tokens are chosen (jax.debug.callback), for streaming.
  Each row continues from its own length, so a ragged batch decodes as each row alone.

  cache_block (with resize_cache): a step reads every slot of the cache, so instead of one
  loop over a full-length cache, run one loop per stage of cache_stages(prompt_len,
  prompt_len + max_new_tokens, cache_block), growing the cache between stages: the
  same tokens, with each step reading about as many slots as positions are filled
  (one loop body compiled per stage).
  """
  if max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if isinstance(min_new_tokens, int) and not 0 <= min_new_tokens <= max_new_tokens:
    raise ConfigError(f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], "
                      f"got {min_new_tokens}")
  if num_samples < 1:
    raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
  rows = prompts.shape[0] * num_samples
  stops = stop_table(1 if stop_ids is None else jnp.shape(stop_ids)[0], eos_id, stop_ids)
  stops = jnp.broadcast_to(stops, (rows, stops.shape[1]))  # [rows, num_stop]
  min_new = jnp.broadcast_to(jnp.asarray(min_new_tokens, jnp.int32), (rows,))
  budget = (jnp.full((rows,), max_new_tokens, jnp.int32) if budgets is None
            else jnp.minimum(jnp.asarray(budgets, jnp.int32), max_new_tokens))
  if stop_strings is not None and stop_state is None:
    stop_state = jnp.zeros((rows, stop_strings.lengths.shape[0]), jnp.int32)

  def choose(logits, step_rng, step, count, done, stop_state):
    """Samples the next token of rows not done: (token, logprob, count, done, stopped,
    stop_state), each with `rows` rows."""
    logits = logits.astype(jnp.float32)
    early = (count < min_new)[:, None]  # [rows, 1]
    logits = jnp.where(early, mask_stop_tokens(logits, stops), logits)
    token = sample_rows(sampler, logits, step_rng)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=1)[:, 0]
    emitted = ~done
    token = jnp.where(emitted, token, pad_id)
    logprob = jnp.where(emitted, logprob, 0.0)
    stopped = emitted & jnp.any(token[:, None] == stops, axis=1)
    if stop_strings is not None:
      fed = jnp.where(emitted & (count >= min_new), token, -1)
      stop_state, hit = stop_strings_lib.advance(stop_strings, stop_state, fed)
      stopped = stopped | (emitted & hit)
    count = count + emitted
    if on_step is not None:
      jax.debug.callback(on_step, step, token, emitted, *on_step_args, ordered=True)
    return token, logprob, count, done | stopped | (count >= budget), stopped, stop_state

  stages, cache = first_stage(cache, prompts.shape[1], max_new_tokens, cache_block,
                              resize_cache)
  last_logits, cache = prefill(tokens_to_logits, cache, prompts, prompt_lengths,
                               prefill_to_logits)  # [batch, vocab]
  # Samples of one prompt share its prefill: copy its cache rows (and last logits).
  last_logits = repeat_rows(last_logits, num_samples)  # [rows, vocab]
  cache = repeat_rows(cache, num_samples, cache_batch_axis)
  position = repeat_rows(prompt_lengths.astype(jnp.int32), num_samples)  # [rows]
  rng, first_rng = split_rng(rng)
  zeros = jnp.zeros((rows,), jnp.int32)
  first, first_logprob, count, done, stopped, stop_state = choose(
      last_logits, first_rng, 0, zeros, budget <= 0, stop_state)
  state = DecodeState(
      step=jnp.array(1, jnp.int32), last_token=first, position=position,
      generated=jnp.full((rows, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first),
      logprobs=jnp.zeros((rows, max_new_tokens), jnp.float32).at[:, 0].set(first_logprob),
      count=count, done=done, stopped=stopped, stop_state=stop_state, cache=cache, rng=rng)

  def cond(s: DecodeState):
    return (s.step < max_new_tokens) & ~jnp.all(s.done)

  def body(s: DecodeState):
    logits, cache = tokens_to_logits(s.last_token[:, None], s.position[:, None], s.cache)
    rng, step_rng = split_rng(s.rng)
    token, logprob, count, done, stopped, stop_state = choose(
        logits[:, 0], step_rng, s.step, s.count, s.done, s.stop_state)
    return DecodeState(
        step=s.step + 1, last_token=token,
        position=jnp.where(s.done, s.position, s.position + 1),  # a done row stays put
        generated=jax.lax.dynamic_update_slice(s.generated, token[:, None], (0, s.step)),
        logprobs=jax.lax.dynamic_update_slice(s.logprobs, logprob[:, None], (0, s.step)),
        count=count, done=done, stopped=s.stopped | stopped, stop_state=stop_state,
        cache=cache, rng=rng)

  # The next step writes slot `position` of each row.
  state = staged_while_loop(cond, body, state, stages, resize_cache,
                            lambda s: jnp.max(s.position))
  return DecodeResult(tokens=state.generated, lengths=state.count, logprobs=state.logprobs,
                      stopped=state.stopped, stop_state=state.stop_state)

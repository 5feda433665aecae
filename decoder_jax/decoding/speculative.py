"""speculative_generate(): a small draft model proposes `num_draft` tokens, the target
scores them all in one forward pass and keeps a prefix of them (Leviathan et al., 2023;
Chen et al., 2023), inside one `lax.while_loop`.

Both models are reached as in loop.generate, through

    tokens_to_logits(tokens [rows, T], positions [rows, T], cache) -> (logits [rows, T, vocab], cache)

(the draft's with its own cache). One iteration, for every row:
  1. the draft feeds its last two tokens (the one before the last is already in its cache
     unless all drafts were taken last time; writing it again changes nothing) and then
     its own proposals, one at a time: d_1..d_k, each drawn from its filtered
     distribution p_i (the sampler's `filtered`: temperature, top-k, top-p);
  2. the target feeds [last, d_1..d_k] at once: its distributions q_1..q_{k+1};
  3. d_i is kept while u_i < q_i(d_i) / p_i(d_i) (u_i uniform); at the first refusal the
     next token is drawn from max(0, q - p) renormalised, and if all k are kept, from
     q_{k+1}. Each emitted token is then distributed exactly as the target's own sampler
     would draw it. Greedy keeps d_i while it is the target's argmax and then emits the
     target's argmax: the tokens of plain greedy decoding.
Rows accept different numbers of tokens, so each keeps its own position. Cache slots
past a row's position may hold refused tokens' keys and values: they are never read
(a query at position p sees slots <= p) and are written over when the row gets there.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from decoder_jax.decoding.loop import mask_stop_tokens, prefill, sample_rows, stop_table
from decoder_jax.decoding.samplers import Greedy
from decoder_jax.errors import ConfigError


@struct.dataclass
class SpeculativeState:
  count: jax.Array  # int32 [rows]: tokens emitted
  last: jax.Array  # int32 [rows]: the last emitted token (not yet in the target's cache)
  prev: jax.Array  # int32 [rows]: the token before it
  position: jax.Array  # int32 [rows]: position of `last`
  generated: jax.Array  # int32 [rows, max_new_tokens + num_draft + 1]
  logprobs: jax.Array  # float32 [rows, max_new_tokens + num_draft + 1]
  done: jax.Array  # bool [rows]
  stopped: jax.Array  # bool [rows]: ended on a stop token
  target_cache: Any
  draft_cache: Any
  rng: jax.Array  # a key, or keys [rows]
  proposed: jax.Array  # int32 []: draft tokens proposed to rows still going
  accepted: jax.Array  # int32 []: of those, kept by the target
  iterations: jax.Array  # int32 []: target forward passes after the prefill


@struct.dataclass
class SpeculativeResult:
  tokens: jax.Array  # int32 [rows, max_new_tokens], pad_id after each row's end
  lengths: jax.Array  # int32 [rows]
  logprobs: jax.Array  # float32 [rows, max_new_tokens]: target log p of each token
  stopped: jax.Array  # bool [rows]
  proposed: jax.Array  # int32 []
  accepted: jax.Array  # int32 []
  iterations: jax.Array  # int32 []


def _split(rng, n: int):
  """n keys (or n [rows] key arrays) from a key or keys [rows]."""
  if jnp.ndim(rng) == 0:
    return list(jax.random.split(rng, n))
  parts = jax.vmap(lambda k: jax.random.split(k, n))(rng)  # [rows, n]
  return [parts[:, i] for i in range(n)]


def _uniform(rng, shape):
  if jnp.ndim(rng) == 0:
    return jax.random.uniform(rng, shape)
  return jax.vmap(lambda k: jax.random.uniform(k, shape[1:]))(rng)


def _categorical(rng, logits):  # logits [rows, vocab] -> int32 [rows]
  return sample_rows(lambda lg, key: jax.random.categorical(key, lg, axis=-1), logits,
                     rng).astype(jnp.int32)


def _write_at(buffer, chunk, at):  # one row: chunk [n] into buffer [width] from index `at`
  return jax.lax.dynamic_update_slice(buffer, chunk, (at,))


def _leading_true(mask):
  """bool [rows, k] -> int32 [rows]: how many entries are True before the first False."""
  return jnp.sum(jnp.cumprod(mask.astype(jnp.int32), axis=1), axis=1)


def speculative_generate(target_fn: Callable, draft_fn: Callable, target_cache, draft_cache,
                         prompts, prompt_lengths, *, max_new_tokens: int, num_draft: int,
                         sampler, rng, eos_id: int | None = None, stop_ids=None,
                         min_new_tokens: int = 0, pad_id: int = 0,
                         target_prefill: Callable | None = None,
                         draft_prefill: Callable | None = None) -> SpeculativeResult:
  """Decodes up to `max_new_tokens` after each prompt with the draft's help. Call under jit.

  prompts: int32 [rows, prompt_len], right-padded; prompt_lengths: int32 [rows] (>= 1).
  Both caches are empty, for `rows` rows, with room for prompt_len + max_new_tokens +
  num_draft positions (the target scores num_draft tokens past the last it keeps).
  rng: a key, or keys [rows] (each row drawing alone). eos_id / stop_ids / min_new_tokens
  as in loop.generate. *_prefill: as loop.generate's prefill_to_logits.
  """
  if num_draft < 1:
    raise ConfigError(f"num_draft must be >= 1, got {num_draft}")
  if max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  rows, k = prompts.shape[0], num_draft
  greedy = isinstance(sampler, Greedy)
  filtered = (lambda lg: lg) if greedy else sampler.filtered
  stops = stop_table(1 if stop_ids is None else jnp.shape(stop_ids)[0], eos_id, stop_ids)
  stops = jnp.broadcast_to(stops, (rows, stops.shape[1]))  # [rows, num_stop]

  def masked(logits, emitted_before):  # logits [rows, vocab] of token number emitted_before
    logits = logits.astype(jnp.float32)
    return jnp.where((emitted_before < min_new_tokens)[:, None],
                     mask_stop_tokens(logits, stops), logits)

  def draw(logits, key):  # masked logits [rows, vocab] -> int32 [rows]
    if greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return _categorical(key, filtered(logits))

  last_logits, target_cache = prefill(target_fn, target_cache, prompts, prompt_lengths,
                                      target_prefill)  # [rows, vocab]
  _, draft_cache = prefill(draft_fn, draft_cache, prompts, prompt_lengths, draft_prefill)
  rng, first_key = _split(rng, 2)
  zeros = jnp.zeros((rows,), jnp.int32)
  first_logits = masked(last_logits, zeros)
  first = draw(first_logits, first_key)
  first_logprob = jnp.take_along_axis(jax.nn.log_softmax(first_logits), first[:, None], 1)[:, 0]
  stopped = jnp.any(first[:, None] == stops, axis=1)
  width = max_new_tokens + k + 1
  last_prompt = jnp.take_along_axis(prompts, (prompt_lengths - 1)[:, None], axis=1)[:, 0]
  state = SpeculativeState(
      count=zeros + 1, last=first, prev=last_prompt.astype(jnp.int32),
      position=prompt_lengths.astype(jnp.int32),
      generated=jnp.full((rows, width), pad_id, jnp.int32).at[:, 0].set(first),
      logprobs=jnp.zeros((rows, width), jnp.float32).at[:, 0].set(first_logprob),
      done=stopped | (max_new_tokens <= 1), stopped=stopped, target_cache=target_cache,
      draft_cache=draft_cache, rng=rng, proposed=jnp.array(0, jnp.int32),
      accepted=jnp.array(0, jnp.int32), iterations=jnp.array(0, jnp.int32))

  def body(s: SpeculativeState):
    rng, *keys = _split(s.rng, k + 3)
    draft_keys, uniform_key, final_key = keys[:k], keys[k], keys[k + 1]
    # 1. The draft proposes d_1..d_k.
    two = jnp.stack([s.prev, s.last], axis=1)  # [rows, 2]
    logits, draft_cache = draft_fn(two, jnp.stack([s.position - 1, s.position], axis=1),
                                   s.draft_cache)
    step_logits = logits[:, 1]
    drafts, draft_filtered = [], []
    for i in range(k):
      step_logits = masked(step_logits, s.count + i)
      drafts.append(draw(step_logits, draft_keys[i]))
      draft_filtered.append(filtered(step_logits))
      if i < k - 1:
        logits, draft_cache = draft_fn(drafts[-1][:, None], (s.position + 1 + i)[:, None],
                                       draft_cache)
        step_logits = logits[:, 0]
    proposal = jnp.stack(drafts, axis=1)  # [rows, k]
    # 2. The target scores [last, d_1..d_k] in one pass.
    fed = jnp.concatenate([s.last[:, None], proposal], axis=1)  # [rows, k + 1]
    offsets = jnp.arange(k + 1, dtype=jnp.int32)
    target_logits, target_cache = target_fn(fed, s.position[:, None] + offsets, s.target_cache)
    target_logits = jax.vmap(masked, in_axes=(1, 1), out_axes=1)(
        target_logits, s.count[:, None] + offsets)  # [rows, k + 1, vocab]
    # 3. Keep a prefix of the proposal, then one token of the target's.
    if greedy:
      best = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [rows, k + 1]
      kept = _leading_true(proposal == best[:, :k])  # [rows]
      final = jnp.take_along_axis(best, kept[:, None], axis=1)[:, 0]
    else:
      q = jax.nn.softmax(jax.vmap(filtered, in_axes=1, out_axes=1)(target_logits), axis=-1)
      p = jax.nn.softmax(jnp.stack(draft_filtered, axis=1), axis=-1)  # [rows, k, vocab]
      q_d = jnp.take_along_axis(q[:, :k], proposal[:, :, None], axis=2)[..., 0]  # [rows, k]
      p_d = jnp.take_along_axis(p, proposal[:, :, None], axis=2)[..., 0]
      kept = _leading_true(_uniform(uniform_key, (rows, k)) * p_d < q_d)
      # The residual max(0, q - p) at the first refusal; q itself after k acceptances
      # (p padded with a zero distribution at index k).
      p = jnp.concatenate([p, jnp.zeros_like(p[:, :1])], axis=1)
      q_n = jnp.take_along_axis(q, kept[:, None, None], axis=1)[:, 0]  # [rows, vocab]
      p_n = jnp.take_along_axis(p, kept[:, None, None], axis=1)[:, 0]
      residual = jnp.maximum(q_n - p_n, 0.0)
      residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, q_n)  # q == p
      final = _categorical(final_key, jnp.log(residual))
    emitted = jnp.concatenate([proposal, jnp.full((rows, 1), pad_id, jnp.int32)], axis=1)
    emitted = jnp.where(offsets[None] == kept[:, None], final[:, None], emitted)  # [rows, k+1]
    # A stop token ends the row where it stands; so does max_new_tokens.
    in_run = offsets[None] <= kept[:, None]
    is_stop = jnp.any(emitted[:, :, None] == stops[:, None, :], axis=2) & in_run
    first_stop = jnp.argmax(is_stop, axis=1)
    n = jnp.where(is_stop.any(axis=1), first_stop + 1, kept + 1)
    n = jnp.where(s.done, 0, jnp.minimum(n, max_new_tokens - s.count))  # [rows]
    stopped = is_stop.any(axis=1) & (first_stop < n)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(target_logits), emitted[:, :, None],
                                  axis=2)[..., 0]  # [rows, k + 1]
    valid = offsets[None] < n[:, None]
    generated = jax.vmap(_write_at)(s.generated, jnp.where(valid, emitted, pad_id), s.count)
    logprobs = jax.vmap(_write_at)(s.logprobs, jnp.where(valid, logprob, 0.0), s.count)

    def pick(index):  # emitted[row, index[row]] ([rows]), index clipped at 0
      return jnp.take_along_axis(emitted, jnp.maximum(index, 0)[:, None], axis=1)[:, 0]

    live = ~s.done
    count = s.count + n
    return SpeculativeState(
        count=count, last=jnp.where(n > 0, pick(n - 1), s.last),
        prev=jnp.where(n >= 2, pick(n - 2), jnp.where(n == 1, s.last, s.prev)),
        position=s.position + n, generated=generated, logprobs=logprobs,
        done=s.done | stopped | (count >= max_new_tokens), stopped=s.stopped | stopped,
        target_cache=target_cache, draft_cache=draft_cache, rng=rng,
        proposed=s.proposed + k * jnp.sum(live), accepted=s.accepted + jnp.sum(
            jnp.where(live, jnp.minimum(kept, n), 0)),
        iterations=s.iterations + 1)

  state = jax.lax.while_loop(lambda s: ~jnp.all(s.done), body, state)
  return SpeculativeResult(tokens=state.generated[:, :max_new_tokens], lengths=state.count,
                           logprobs=state.logprobs[:, :max_new_tokens], stopped=state.stopped,
                           proposed=state.proposed, accepted=state.accepted,
                           iterations=state.iterations)

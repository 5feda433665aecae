"""beam_search(): keep the `num_beams` most probable continuations of each prompt.

Like generate() in loop.py, the model is reached only through

    tokens_to_logits(tokens [rows, T], positions [rows, T], cache)
        -> (logits [rows, T, vocab], cache)

The prompts are prefilled once for `batch` rows; the cache rows are then repeated
`num_beams` times (row b * num_beams + k is beam k of prompt b) and one `lax.while_loop`
feeds one token per beam per iteration, reordering the cache rows after the beams'
parents at every step.

Two static-size sets per prompt, as in t5x and Hugging Face:
  alive:    the best `num_beams` hypotheses without eos, ranked by summed log-probability;
  finished: the best `num_beams` hypotheses that emitted eos, ranked by their
            length-penalised score sum_logprobs / length ** length_penalty
            (length = generated tokens, eos included; the Hugging Face convention).
Each step ranks the top 2 * num_beams extensions of the alive beams: a beam has one eos
extension at most, so at least num_beams of them continue without eos.

Termination: the loop runs until max_new_tokens tokens, or until, for every prompt, no
alive beam can still beat the worst finished hypothesis. That test uses an exact bound,
not Hugging Face's heuristic: log-probabilities are <= 0, so an alive beam's sum can only
fall as it grows, and its final score is at most
  sum / max_new_tokens ** length_penalty   if length_penalty > 0 (longer divides more),
  sum / step ** length_penalty             otherwise (its length is at least `step`).
Stopping early therefore returns the same beams as running to max_new_tokens (up to ties).
At the end, alive beams count as finished with their current length.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from decoder_jax.decoding.loop import first_stage, prefill, staged_while_loop
from decoder_jax.errors import ConfigError


@struct.dataclass
class BeamState:
  step: jax.Array  # int32 []: tokens generated so far by every alive beam
  alive_tokens: jax.Array  # int32 [batch, beams, max_new_tokens]: pad_id after `step`
  alive_logprobs: jax.Array  # float32 [batch, beams]: summed log-probs, descending; -inf: no beam
  finished_tokens: jax.Array  # int32 [batch, beams, max_new_tokens]: pad_id after eos
  finished_scores: jax.Array  # float32 [batch, beams]: length-penalised, descending; -inf: empty
  finished_lengths: jax.Array  # int32 [batch, beams]: generated tokens, eos included
  cache: Any  # the callback's cache, batch * beams rows; holds each alive beam but its last token


@struct.dataclass
class BeamResult:
  tokens: jax.Array  # int32 [batch, num_beams, max_new_tokens], best beam first, pad_id after end
  lengths: jax.Array  # int32 [batch, num_beams]: generated tokens (eos included)
  scores: jax.Array  # float32 [batch, num_beams]: length-penalised log-probability, descending


def _validate(prompts, prompt_lengths, cache, num_beams, max_new_tokens, min_new_tokens,
              cache_batch_axis):
  if num_beams < 1:
    raise ConfigError(f"num_beams must be >= 1, got {num_beams}")
  if max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if not 0 <= min_new_tokens <= max_new_tokens:
    raise ConfigError(f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], "
                      f"got {min_new_tokens}")
  if jnp.ndim(prompts) != 2:
    raise ValueError(f"prompts must be 2-D [batch, prompt_len], got shape {jnp.shape(prompts)}")
  batch = jnp.shape(prompts)[0]
  if jnp.shape(prompt_lengths) != (batch,):
    raise ValueError(f"prompt_lengths must have shape ({batch},), got {jnp.shape(prompt_lengths)}")
  for leaf in jax.tree.leaves(cache):
    if leaf.ndim <= cache_batch_axis or leaf.shape[cache_batch_axis] != batch:
      raise ValueError(f"every cache leaf needs {batch} rows (one per prompt) on axis "
                       f"cache_batch_axis={cache_batch_axis}, got a leaf of shape {leaf.shape}")


def beam_search(tokens_to_logits: Callable, cache, prompts, prompt_lengths, *, num_beams: int,
                max_new_tokens: int, length_penalty: float = 1.0, eos_id: int | None = None,
                min_new_tokens: int = 0, pad_id: int = 0, cache_batch_axis: int = 0,
                prefill_to_logits: Callable | None = None, cache_block: int | None = None,
                resize_cache: Callable | None = None) -> BeamResult:
  """Beam search after each prompt. Call it under jax.jit (num_beams, max_new_tokens static).

  prompts: int32 [batch, prompt_len], right-padded; prompt_lengths: int32 [batch] (>= 1).
  cache: an empty cache for `batch` rows (not batch * num_beams) with room for
    prompt_len + max_new_tokens positions; its batch axis is `cache_batch_axis` in every
    leaf (1 for caches stacked over layers).
  min_new_tokens: eos is masked until that many tokens have been generated.
  cache_block, resize_cache: grow the cache block by block, as in loop.generate (each step
    also reorders the whole cache after the beams' parents, so both read less).
  Slots with score -inf hold no hypothesis (num_beams exceeds the possible continuations):
  their tokens are pad_id and their length 0.
  """
  _validate(prompts, prompt_lengths, cache, num_beams, max_new_tokens, min_new_tokens,
            cache_batch_axis)
  batch = prompts.shape[0]
  beams, n_new = num_beams, max_new_tokens
  neg_inf = jnp.array(-jnp.inf, jnp.float32)

  def penalised(logprobs, length):  # length: int, broadcast against logprobs
    return logprobs / jnp.asarray(length, jnp.float32) ** length_penalty

  def log_probs_of(logits, step):  # logits [batch, beams, vocab] -> float32 log-probs
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if eos_id is not None and min_new_tokens > 0:
      # `step` tokens already generated: eos may not be the next one before min_new_tokens.
      eos_lp = jnp.where(step < min_new_tokens, neg_inf, log_probs[..., eos_id])
      log_probs = log_probs.at[..., eos_id].set(eos_lp)
    return log_probs

  def grow(s: BeamState, log_probs):
    """Picks the next alive and finished sets from log_probs [batch, beams, vocab] of the
    alive beams' next token. Returns (alive tokens, alive logprobs, finished tokens,
    finished scores, finished lengths, parent [batch, beams])."""
    vocab = log_probs.shape[-1]
    flat = (s.alive_logprobs[:, :, None] + log_probs).reshape(batch, beams * vocab)
    n_cand = min(2 * beams, beams * vocab)
    cand_logprobs, cand_index = jax.lax.top_k(flat, n_cand)  # [batch, n_cand]
    cand_parent = cand_index // vocab  # [batch, n_cand]
    cand_token = (cand_index % vocab).astype(jnp.int32)
    cand_tokens = jnp.take_along_axis(s.alive_tokens, cand_parent[:, :, None], axis=1)
    cand_tokens = jax.lax.dynamic_update_slice(
        cand_tokens, cand_token[:, :, None], (0, 0, s.step))  # [batch, n_cand, max_new_tokens]
    is_eos = (jnp.zeros_like(cand_token, bool) if eos_id is None else cand_token == eos_id)

    # Alive: the best non-eos extensions (top_k keeps them sorted, best first).
    alive_logprobs, pick = jax.lax.top_k(jnp.where(is_eos, neg_inf, cand_logprobs), beams)
    alive_tokens = jnp.take_along_axis(cand_tokens, pick[:, :, None], axis=1)
    parent = jnp.take_along_axis(cand_parent, pick, axis=1)  # [batch, beams]

    if eos_id is None:  # nothing can finish
      return (alive_tokens, alive_logprobs, s.finished_tokens, s.finished_scores,
              s.finished_lengths, parent)
    # Finished: merge the eos extensions into the old set; old ones first so ties keep them.
    new_scores = jnp.where(is_eos, penalised(cand_logprobs, s.step + 1), neg_inf)
    scores = jnp.concatenate([s.finished_scores, new_scores], axis=1)  # [batch, beams + n_cand]
    finished_scores, pick = jax.lax.top_k(scores, beams)
    tokens = jnp.concatenate([s.finished_tokens, cand_tokens], axis=1)
    finished_tokens = jnp.take_along_axis(tokens, pick[:, :, None], axis=1)
    lengths = jnp.concatenate(
        [s.finished_lengths, jnp.full((batch, n_cand), s.step + 1, jnp.int32)], axis=1)
    finished_lengths = jnp.take_along_axis(lengths, pick, axis=1)
    return (alive_tokens, alive_logprobs, finished_tokens, finished_scores, finished_lengths,
            parent)

  def advance(s: BeamState, log_probs, cache):
    alive_tokens, alive_logprobs, fin_tokens, fin_scores, fin_lengths, parent = grow(s, log_probs)
    # Cache row b * beams + k must now hold the prefix of new beam k: its parent's row.
    rows = (jnp.arange(batch)[:, None] * beams + parent).reshape(-1)  # [batch * beams]
    cache = jax.tree.map(lambda x: jnp.take(x, rows, axis=cache_batch_axis), cache)
    return BeamState(step=s.step + 1, alive_tokens=alive_tokens, alive_logprobs=alive_logprobs,
                     finished_tokens=fin_tokens, finished_scores=fin_scores,
                     finished_lengths=fin_lengths, cache=cache)

  # Prefill once per prompt, then copy each prompt's cache rows to its beams.
  stages, cache = first_stage(cache, prompts.shape[1], max_new_tokens, cache_block,
                              resize_cache)
  last_logits, cache = prefill(tokens_to_logits, cache, prompts, prompt_lengths,
                               prefill_to_logits)
  last_logits = last_logits[:, None]  # [batch, 1, vocab]
  cache = jax.tree.map(lambda x: jnp.repeat(x, beams, axis=cache_batch_axis), cache)
  empty_tokens = jnp.full((batch, beams, n_new), pad_id, jnp.int32)
  empty_scores = jnp.full((batch, beams), neg_inf)
  # Only beam 0 is live at first, so the first step does not pick the same token K times.
  start_logprobs = empty_scores.at[:, 0].set(0.0)
  state = BeamState(step=jnp.array(0, jnp.int32), alive_tokens=empty_tokens,
                    alive_logprobs=start_logprobs, finished_tokens=empty_tokens,
                    finished_scores=empty_scores,
                    finished_lengths=jnp.zeros((batch, beams), jnp.int32), cache=cache)
  vocab = last_logits.shape[-1]
  first_log_probs = log_probs_of(jnp.broadcast_to(last_logits, (batch, beams, vocab)), state.step)
  state = advance(state, first_log_probs, state.cache)
  beam_positions = jnp.repeat(prompt_lengths.astype(jnp.int32), beams)  # [batch * beams]

  def cond(s: BeamState):
    running = s.step < n_new
    if eos_id is None:
      return running
    # Best final score any alive beam can still reach (see the module docstring).
    best_length = jnp.where(length_penalty > 0, n_new, s.step)
    best_possible = penalised(s.alive_logprobs[:, 0], best_length)  # [batch]
    settled = s.finished_scores[:, -1] >= best_possible  # [batch]
    return running & ~jnp.all(settled)

  def body(s: BeamState):
    last_token = jax.lax.dynamic_index_in_dim(s.alive_tokens, s.step - 1, axis=2,
                                              keepdims=False)  # [batch, beams]
    # The last token of every beam sits at its own prompt's length + step - 1.
    position = beam_positions + s.step - 1  # [batch * beams]
    logits, cache = tokens_to_logits(last_token.reshape(-1, 1), position[:, None], s.cache)
    log_probs = log_probs_of(logits.reshape(batch, beams, -1), s.step)
    return advance(s, log_probs, cache)

  max_position = jnp.max(beam_positions)  # the next step writes slot max_position + step - 1
  state = staged_while_loop(cond, body, state, stages, resize_cache,
                            lambda s: max_position + s.step - 1)

  # Alive beams end here with `step` tokens and compete with the finished ones.
  scores = jnp.concatenate([state.finished_scores,
                            penalised(state.alive_logprobs, state.step)], axis=1)
  scores, pick = jax.lax.top_k(scores, beams)  # [batch, beams], descending
  tokens = jnp.concatenate([state.finished_tokens, state.alive_tokens], axis=1)
  tokens = jnp.take_along_axis(tokens, pick[:, :, None], axis=1)
  lengths = jnp.concatenate([state.finished_lengths,
                             jnp.full((batch, beams), state.step, jnp.int32)], axis=1)
  lengths = jnp.take_along_axis(lengths, pick, axis=1)
  empty = scores == -jnp.inf  # [batch, beams]: no hypothesis in this slot
  return BeamResult(tokens=jnp.where(empty[:, :, None], pad_id, tokens),
                    lengths=jnp.where(empty, 0, lengths), scores=scores)

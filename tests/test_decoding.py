"""The KV-cache while_loop decoder against repeated full forward passes."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoder_jax import decoding, inference
from decoder_jax.model import Decoder, ModelConfig, init_cache, resize_cache

CONFIGS = {
    "gpt2": ModelConfig(family="gpt2", vocab_size=19, num_layers=2, num_heads=2, width=16,
                        max_length=32),
    "llama": ModelConfig(family="llama", vocab_size=19, num_layers=2, num_heads=4,
                         num_kv_heads=2, width=16, max_length=32, use_bias=False),
}


def setup(config):
  model = Decoder(config)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
  return model, params


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def cached_generate(config, params, prompts, lengths, max_new, sampler, eos_id, rng):
  model = Decoder(config)

  def tokens_to_logits(tokens, positions, cache):
    return model.apply({"params": params}, tokens, positions=positions, cache=cache)

  cache = init_cache(config, prompts.shape[0], prompts.shape[1] + max_new)
  return decoding.generate(tokens_to_logits, cache, prompts, lengths, max_new_tokens=max_new,
                           sampler=sampler, rng=rng, eos_id=eos_id)


def greedy_without_cache(model, params, prompt, max_new):
  """Reference: re-run the whole sequence for every new token, no cache.

  The sequence sits in a fixed-width buffer (one compilation); causality makes the
  padding after it irrelevant to the logits read at its last position.
  """
  forward = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])
  buffer = np.zeros((1, model.config.max_length), np.int32)
  buffer[0, :len(prompt)] = prompt
  for length in range(len(prompt), len(prompt) + max_new):
    logits = forward(params, jnp.asarray(buffer))  # [1, max_length, vocab]
    buffer[0, length] = int(jnp.argmax(logits[0, length - 1]))
  return buffer[0, len(prompt):len(prompt) + max_new].tolist()


RAGGED_PROMPTS = [[3, 1, 4, 1, 5, 9], [2, 7], [1, 8, 2, 8], [5]]


def pad(prompts):
  """Right-padded prompts at their exact width (no bucket): ([batch, width], [batch])."""
  array, lengths = inference.pad_prompts(prompts, bucket=False)
  return jnp.asarray(array), jnp.asarray(lengths)


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_ragged_batch_equals_full_forward(name):
  config = CONFIGS[name]
  model, params = setup(config)
  prompts, lengths = pad(RAGGED_PROMPTS)
  result = cached_generate(config, params, prompts, lengths, 8, decoding.Greedy(), None,
                           jax.random.key(0))
  for row, prompt in enumerate(RAGGED_PROMPTS):
    assert result.tokens[row].tolist() == greedy_without_cache(model, params, prompt, 8), row
  assert result.lengths.tolist() == [8] * 4


def test_eos_stops_row_and_pads():
  config = CONFIGS["gpt2"]
  model, params = setup(config)
  prompts, lengths = pad(RAGGED_PROMPTS)
  reference = [greedy_without_cache(model, params, p, 8) for p in RAGGED_PROMPTS]
  eos = reference[0][2]  # a token row 0 emits third: row 0 must stop there
  result = cached_generate(config, params, prompts, lengths, 8, decoding.Greedy(), eos,
                           jax.random.key(0))
  for row, ref in enumerate(reference):
    stop = ref.index(eos) + 1 if eos in ref else 8
    assert int(result.lengths[row]) == stop
    assert result.tokens[row, :stop].tolist() == ref[:stop]
    assert (np.asarray(result.tokens[row, stop:]) == 0).all()


def test_sampling_is_seeded_and_top_k_restricts():
  config = CONFIGS["llama"]
  model, params = setup(config)
  prompts, lengths = pad(RAGGED_PROMPTS)
  run = lambda sampler, seed: cached_generate(config, params, prompts, lengths, 10, sampler,
                                              None, jax.random.key(seed)).tokens
  sampler = decoding.TopK(k=3, temperature=1.0)
  np.testing.assert_array_equal(run(sampler, 1), run(sampler, 1))
  assert not np.array_equal(run(decoding.Temperature(2.0), 1), run(decoding.Temperature(2.0), 2))
  # top-1 sampling is greedy whatever the seed
  np.testing.assert_array_equal(run(decoding.TopK(k=1), 5), run(decoding.Greedy(), 0))


def test_sampler_validation():
  with pytest.raises(ValueError, match="temperature"):
    decoding.Temperature(0.0)
  with pytest.raises(ValueError, match="top_k"):
    decoding.TopK(k=0)
  assert decoding.make_sampler(0.0, 10) == decoding.Greedy()
  assert decoding.make_sampler(0.8) == decoding.Temperature(0.8)
  assert decoding.make_sampler(0.8, 5, 0.9) == decoding.TopP(0.9, 0.8, 5)
  assert decoding.make_sampler(0.8, 5) == decoding.TopK(5, 0.8)


def test_prefill_at_the_last_positions_only_changes_nothing():
  """inference's prefill_to_logits (output layer at each row's last prompt token only)
  gives generate and beam_search the same results as full prompt logits."""
  config = CONFIGS["llama"]
  _, params = setup(config)
  prompts, lengths = pad(RAGGED_PROMPTS)
  tokens_to_logits, prefill_to_logits = inference._model_fns(config, params)

  @functools.partial(jax.jit, static_argnums=(0, 1))
  def both(search, prefill_fn):
    cache = init_cache(config, prompts.shape[0], prompts.shape[1] + 6)
    if search:
      return decoding.beam_search(tokens_to_logits, cache, prompts, lengths, num_beams=3,
                                  max_new_tokens=6, eos_id=2, prefill_to_logits=prefill_fn)
    return decoding.generate(tokens_to_logits, cache, prompts, lengths, max_new_tokens=6,
                             sampler=decoding.TopK(4), rng=jax.random.key(1), eos_id=2,
                             prefill_to_logits=prefill_fn)

  for search in (False, True):
    full, last_only = both(search, None), both(search, prefill_to_logits)
    np.testing.assert_array_equal(last_only.tokens, full.tokens)
    np.testing.assert_array_equal(last_only.lengths, full.lengths)
    extra = "scores" if search else "logprobs"
    np.testing.assert_allclose(getattr(last_only, extra), getattr(full, extra), atol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("scan_layers", [False, True])
def test_prefill_into_an_empty_cache_attends_over_the_prompt_alone(name, scan_layers):
  """empty_cache=True (keys of the chunk only, causal) gives the logits and the cache of
  attending over every cache slot."""
  config = dataclasses.replace(CONFIGS[name], scan_layers=scan_layers)
  model, params = setup(config)
  prompts, _ = pad(RAGGED_PROMPTS)  # [4, 6]
  cache = init_cache(config, prompts.shape[0], 20)

  def prefill(empty_cache):
    return model.apply({"params": params}, prompts, cache=cache, empty_cache=empty_cache)

  (all_slots, cache_a), (own_keys, cache_b) = prefill(False), prefill(True)
  np.testing.assert_allclose(own_keys, all_slots, atol=1e-5)
  # Layer 0 writes the same keys; later layers' differ by the rounding of their inputs.
  jax.tree.map(lambda b, a: np.testing.assert_allclose(b, a, atol=1e-6), cache_b, cache_a)
  # Only the all-slots path scores the 6 queries against the 20 slots.
  lowered = {e: jax.jit(prefill, static_argnums=0).lower(e).as_text() for e in (False, True)}
  assert "x6x20xf32>" in lowered[False] and "x6x20xf32>" not in lowered[True]


def test_empty_cache_prefill_refuses_positions_and_a_missing_cache():
  """Attending over the chunk alone is right only from position 0, so the positions are
  built by the model; a caller's (e.g. a continuation's) are refused, not trusted."""
  config = CONFIGS["llama"]
  model, params = setup(config)
  prompts, _ = pad(RAGGED_PROMPTS)  # [4, 6]
  later = jnp.broadcast_to(jnp.arange(3, 9, dtype=jnp.int32), prompts.shape)
  with pytest.raises(ValueError, match="no positions"):
    model.apply({"params": params}, prompts, positions=later,
                cache=init_cache(config, 4, 20), empty_cache=True)
  with pytest.raises(ValueError, match="pass a cache"):
    model.apply({"params": params}, prompts, empty_cache=True)


def test_cache_stages_grow_by_block_from_the_prompt():
  assert decoding.loop.cache_stages(32, 288, 64) == [64, 128, 192, 256, 288]
  assert decoding.loop.cache_stages(63, 300, 64) == [64, 128, 192, 256, 300]
  assert decoding.loop.cache_stages(64, 300, 64) == [128, 192, 256, 300]
  assert decoding.loop.cache_stages(100, 120, 64) == [120]  # one stage: the whole cache
  with pytest.raises(ValueError, match="cache_block"):
    decoding.loop.cache_stages(8, 16, 0)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_resize_cache_cuts_or_zero_pads_the_slot_axis(scan_layers):
  config = dataclasses.replace(CONFIGS["llama"], scan_layers=scan_layers)
  cache = jax.tree.map(lambda a: jax.random.normal(jax.random.key(0), a.shape),
                       init_cache(config, 3, 8))
  cut, grown = resize_cache(cache, 5), resize_cache(cache, 11)
  for old, short, long in zip(*(jax.tree.leaves(c) for c in (cache, cut, grown))):
    assert short.shape[-2] == 5 and long.shape[-2] == 11  # [(layers,) b, kv, slots, d]
    np.testing.assert_array_equal(short, old[..., :5, :])
    np.testing.assert_array_equal(long[..., :8, :], old)
    assert not np.any(long[..., 8:, :])


@pytest.mark.parametrize("name,scan_layers", [("llama", False), ("gpt2", True)])
def test_growing_cache_decodes_as_one_full_length_cache(name, scan_layers):
  """generate_tokens with cache_block=3 runs four loops over caches of 9, 12, 15 and 16
  slots (prompt width 6, 10 new tokens) and gives the tokens, lengths and logprobs of one
  16-slot cache: ragged prompts, sampling, a stop token, min_new_tokens."""
  config = dataclasses.replace(CONFIGS[name], scan_layers=scan_layers)
  _, params = setup(config)
  prompts, lengths = pad(RAGGED_PROMPTS)

  def run(cache_block, eos_id=None):
    return inference.generate_tokens(
        params, prompts, lengths, jax.random.key(3), model_config=config, max_new_tokens=10,
        sampler=decoding.TopK(4), eos_id=eos_id, min_new_tokens=2, cache_block=cache_block)

  eos = int(run(None).tokens[0, 6])  # a token the model emits: some row stops early
  full, staged = run(None, eos), run(3, eos)
  np.testing.assert_array_equal(staged.tokens, full.tokens)
  np.testing.assert_array_equal(staged.lengths, full.lengths)
  np.testing.assert_allclose(staged.logprobs, full.logprobs, atol=1e-5)
  assert int(full.lengths.min()) < 10  # some row stopped early
  loops = str(jax.make_jaxpr(lambda p: run(3).tokens)(params)).count("while[")
  assert loops == len(decoding.loop.cache_stages(6, 16, 3)) == 4


def test_cache_block_without_resize_is_refused():
  config = CONFIGS["gpt2"]
  _, params = setup(config)
  prompts, lengths = pad(RAGGED_PROMPTS)
  tokens_to_logits, _ = inference._model_fns(config, params)
  with pytest.raises(ValueError, match="resize_cache"):
    decoding.generate(tokens_to_logits, init_cache(config, 4, 16), prompts, lengths,
                      max_new_tokens=10, sampler=decoding.Greedy(), rng=jax.random.key(0),
                      cache_block=4)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_growing_cache_beam_search_finds_the_same_beams(scan_layers):
  """beam_search_tokens with cache_block=3 (four loops, the cache reordered after the
  beams' parents in each) returns the beams of one full-length cache."""
  config = dataclasses.replace(CONFIGS["llama"], scan_layers=scan_layers)
  _, params = setup(config)
  prompts, lengths = pad(RAGGED_PROMPTS)

  def run(cache_block):
    return inference.beam_search_tokens(params, prompts, lengths, model_config=config,
                                        num_beams=3, max_new_tokens=10, eos_id=2,
                                        min_new_tokens=1, cache_block=cache_block)

  full, staged = run(None), run(3)
  np.testing.assert_array_equal(staged.tokens, full.tokens)
  np.testing.assert_array_equal(staged.lengths, full.lengths)
  np.testing.assert_allclose(staged.scores, full.scores, atol=1e-5)
  assert str(jax.make_jaxpr(lambda p: run(3).tokens)(params)).count("while[") == 4

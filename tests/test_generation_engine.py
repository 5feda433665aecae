"""The decoding engine around the while_loop: samplers' distributions, stop sets, logprobs,
prompt buckets, sharded decoding, scoring and request validation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from scipy import stats

from decoder_jax import decoding, inference
from decoder_jax.data.tokenizers import CharTokenizer
from decoder_jax.model import Decoder, ModelConfig
from decoder_jax import sharding

ALPHABET = "abcdefghijklmnopqrstuvwxyz .\n"
CONFIG = ModelConfig(family="llama", vocab_size=len(ALPHABET), num_layers=2, num_heads=4,
                     num_kv_heads=2, width=32, max_length=64, use_bias=False)


@pytest.fixture(scope="module")
def trained():
  params = nn.unbox(Decoder(CONFIG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  return inference.TrainedModel(CONFIG, params, CharTokenizer.from_text(ALPHABET), step=0)


def full_forward_logprobs(trained, prompt_ids, generated_ids):
  """log p of each generated token from one cache-free forward pass (right-padded to the
  context, one compilation for every row: causality keeps the padding out of it)."""
  sequence = prompt_ids + generated_ids
  tokens = np.zeros((1, CONFIG.max_length), np.int32)  # [1, context]
  tokens[0, :len(sequence)] = sequence
  logprobs = np.asarray(_full_logprobs(trained.params, tokens))[0]  # [context, vocab]
  start = len(prompt_ids) - 1
  return np.asarray([logprobs[start + i, t] for i, t in enumerate(generated_ids)])


@jax.jit
def _full_logprobs(params, tokens):
  logits, _ = Decoder(CONFIG).apply({"params": params}, tokens)
  return jax.nn.log_softmax(logits.astype(jnp.float32))


def test_step_logprobs_match_full_forward_on_a_ragged_batch(trained):
  prompts = ["the cat", "a", "sat on the mat.", "dog"]
  ids = [inference.encode_prompt(trained.tokenizer, p) for p in prompts]
  array, lengths = inference.pad_prompts(ids)
  result = inference.generate_tokens(trained.params, array, lengths, jax.random.key(3),
                                     model_config=CONFIG, max_new_tokens=12,
                                     sampler=decoding.TopK(5, 1.5))
  for row, prompt_ids in enumerate(ids):
    generated = np.asarray(result.tokens[row]).tolist()
    np.testing.assert_allclose(np.asarray(result.logprobs[row]),
                               full_forward_logprobs(trained, prompt_ids, generated), atol=1e-5)


def draws(sampler, logits, n=4000, seed=0):
  keys = jax.random.split(jax.random.key(seed), n)
  return np.asarray(jax.vmap(lambda k: sampler(logits[None], k)[0])(keys))


LOGITS = jnp.log(jnp.asarray([0.30, 0.25, 0.15, 0.12, 0.08, 0.05, 0.03, 0.02]))


def test_top_k_and_top_p_stay_inside_their_sets():
  assert set(draws(decoding.TopK(3), LOGITS)) == {0, 1, 2}
  # Nucleus 0.6: 0.30 + 0.25 = 0.55 < 0.6, so the third token (0.15) completes the set.
  assert set(draws(decoding.TopP(0.6), LOGITS)) == {0, 1, 2}
  assert set(draws(decoding.TopP(0.25), LOGITS)) == {0}
  # Combined: top-k 2 first, then nucleus over what is left.
  assert set(draws(decoding.TopP(0.9, top_k=2), LOGITS)) == {0, 1}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_temperature_sampling_matches_the_softmax(temperature):
  counts = np.bincount(draws(decoding.Temperature(temperature), LOGITS, n=20000), minlength=8)
  probs = np.asarray(jax.nn.softmax(LOGITS / temperature), np.float64)
  expected = probs / probs.sum() * counts.sum()
  assert stats.chisquare(counts, expected).pvalue > 0.001


def test_temperature_zero_is_greedy(trained):
  outputs = [inference.generate_batch(trained, ["the ca"], max_new_tokens=8, sampler=sampler,
                                      seed=seed)[0]["samples"][0]["tokens"]
             for sampler, seed in [(decoding.make_sampler(0.0, 5, 0.5), 1), (decoding.Greedy(), 2)]]
  assert outputs[0] == outputs[1]


def test_a_row_that_hits_its_stop_token_stops_while_others_continue(trained):
  prompts = ["the cat", "a dog"]
  ids = [inference.encode_prompt(trained.tokenizer, p) for p in prompts]
  array, lengths = inference.pad_prompts(ids)
  greedy = lambda stop_ids, min_new=0: inference.generate_tokens(  # noqa: E731
      trained.params, array, lengths, jax.random.key(0), stop_ids, model_config=CONFIG,
      max_new_tokens=10, sampler=decoding.Greedy(), min_new_tokens=min_new)
  free = greedy(np.full((2, 1), -1, np.int32))
  stop = int(free.tokens[0, 3])  # row 0's fourth token becomes row 0's stop token
  stopped = greedy(np.asarray([[stop], [-1]], np.int32))
  first = np.asarray(free.tokens[0]).tolist().index(stop)
  assert int(stopped.lengths[0]) == first + 1
  assert (np.asarray(stopped.tokens[0, first + 1:]) == 0).all()
  np.testing.assert_array_equal(stopped.tokens[1], free.tokens[1])  # row 1 unaffected
  assert int(stopped.lengths[1]) == 10
  # min_new_tokens=6: the stop token is masked for the first 6 tokens of the row.
  late = greedy(np.asarray([[stop], [-1]], np.int32), min_new=6)
  assert stop not in np.asarray(late.tokens[0, :6]).tolist()
  assert int(late.lengths[0]) >= 7


def test_prompts_of_one_bucket_compile_once(trained):
  before = inference.generate_tokens._cache_size()
  for prompt in ["ab", "abc de", "the cat s", "the cat sat"]:  # lengths 2..11 -> buckets 8, 16
    inference.generate_batch(trained, [prompt, "x"], max_new_tokens=5)
  assert inference.generate_tokens._cache_size() - before == 2


def test_sharded_decoding_matches_one_device(trained):
  prompts = ["the cat", "a", "sat on", "dog", "mat.", "x y z", "hello", "no"]
  ids = [inference.encode_prompt(trained.tokenizer, p) for p in prompts]
  array, lengths = inference.pad_prompts(ids)
  run = lambda params, a, l: inference.generate_tokens(  # noqa: E731
      params, a, l, jax.random.key(1), model_config=CONFIG, max_new_tokens=10,
      sampler=decoding.TopK(4))
  single = run(trained.params, array, lengths)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  params = jax.device_put(trained.params, inference.param_shardings(CONFIG, mesh))
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  with inference.decoding_mesh(mesh):
    sharded = run(params, jax.device_put(array, batch), jax.device_put(lengths, batch))
  assert params["block_0"]["mlp"]["down"]["kernel"].sharding.spec == P("tensor", "fsdp")
  np.testing.assert_array_equal(sharded.tokens, single.tokens)
  np.testing.assert_allclose(sharded.logprobs, single.logprobs, atol=1e-5)


def test_scoring_equals_the_decoder_logprobs(trained):
  out = inference.generate_batch(trained, ["the cat"], max_new_tokens=6)[0]["samples"][0]
  prompt_ids = inference.encode_prompt(trained.tokenizer, "the cat")
  tokens = np.asarray([prompt_ids + out["tokens"]], np.int32)
  score = inference.score_tokens(trained.params, tokens, np.asarray([len(prompt_ids)]),
                                 np.asarray([tokens.shape[1]]), model_config=CONFIG)
  np.testing.assert_allclose(float(score[0]), out["logprob"], atol=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_beams=2, max_new_tokens=64), "does not fit"),
    (dict(prompts=[""]), "no BOS"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(num_beams=0), "num_beams"),
    (dict(min_new_tokens=20), "min_new_tokens"),
    (dict(stop=("",)), "stop string is empty"),
    (dict(seed=[1, 2]), "2 seeds for 1 prompts"),
])
def test_bad_requests_fail_before_compiling(trained, kwargs, message):
  request = dict(prompts=["the cat"], max_new_tokens=10)
  request.update(kwargs)
  before = inference.generate_tokens._cache_size()
  with pytest.raises(ValueError, match=message):
    inference.generate_batch(trained, request.pop("prompts"), **request)
  assert inference.generate_tokens._cache_size() == before


@pytest.mark.parametrize("args, message", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=0), "top_k"),
    (dict(temperature=-0.5), "temperature"),
])
def test_bad_sampler_arguments(args, message):
  with pytest.raises(ValueError, match=message):
    decoding.make_sampler(**args)


def test_beam_search_through_the_batch_api_scores_its_beams(trained):
  result = inference.generate_batch(trained, ["the cat", "a"], max_new_tokens=6, num_beams=3,
                                    length_penalty=0.0)
  prompt_ids = [inference.encode_prompt(trained.tokenizer, p) for p in ["the cat", "a"]]
  for ids, row in zip(prompt_ids, result):
    scores = [s["logprob"] for s in row["samples"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    for sample in row["samples"]:
      tokens = np.asarray([ids + sample["tokens"]], np.int32)
      score = inference.score_tokens(trained.params, tokens, np.asarray([len(ids)]),
                                     np.asarray([tokens.shape[1]]), model_config=CONFIG)
      np.testing.assert_allclose(float(score[0]), sample["logprob"], atol=1e-4)

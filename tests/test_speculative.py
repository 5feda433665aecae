"""Speculative decoding: greedy gives plain greedy's tokens, sampling gives the target's
own distribution (chi-square against exact probabilities), and bad drafts are refused."""

import dataclasses
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from decoder_jax import decoding, inference
from decoder_jax.data.tokenizers import CharTokenizer
from decoder_jax.errors import ConfigError
from decoder_jax.model import Decoder, ModelConfig

ALPHABET = "abcdefghijklmnopqrstuvwxyz .\n"
# init_std 0.3: at the default 0.02 a random model's greedy output repeats one token, which
# would make "the same tokens" an easy test.
TARGETS = {
    "llama": ModelConfig(family="llama", vocab_size=len(ALPHABET), num_layers=3, num_heads=4,
                         num_kv_heads=2, width=32, max_length=48, use_bias=False,
                         init_std=0.3),
    "gpt2": ModelConfig(family="gpt2", vocab_size=len(ALPHABET), num_layers=3, num_heads=2,
                        width=32, max_length=48, init_std=0.3),
    "llama_scan": ModelConfig(family="llama", vocab_size=len(ALPHABET), num_layers=3,
                              num_heads=4, num_kv_heads=2, width=32, max_length=48,
                              use_bias=False, scan_layers=True, init_std=0.3),
}
PROMPTS = ["the cat sat", "a", "hello there", "xy z"]


def model(config, seed):
  params = nn.unbox(Decoder(config).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))
                    ["params"])
  return inference.TrainedModel(config, params, CharTokenizer.from_text(ALPHABET))


def tokens_of(results):
  return [r["samples"][0]["tokens"] for r in results]


@pytest.mark.parametrize("name, num_draft, kind", [
    ("llama", 1, "self"), ("llama", 3, "separate"), ("gpt2", 3, "self"),
    ("llama_scan", 3, "separate"), ("llama_scan", 2, "self")])
def test_greedy_speculative_equals_plain_greedy(name, num_draft, kind):
  target = model(TARGETS[name], 0)
  plain = inference.generate_batch(target, PROMPTS, max_new_tokens=20)
  draft = (inference.self_draft(target, 1) if kind == "self" else
           model(dataclasses.replace(TARGETS[name], num_layers=1, width=16), 5))
  spec = inference.generate_batch(target, PROMPTS, max_new_tokens=20, draft=draft,
                                  num_draft=num_draft)
  assert tokens_of(spec) == tokens_of(plain)
  for a, b in zip(spec, plain):
    np.testing.assert_allclose(a["samples"][0]["logprob"], b["samples"][0]["logprob"],
                               atol=1e-4)


def test_stop_tokens_and_min_new_tokens_end_rows_as_plain_decoding():
  target = model(TARGETS["llama"], 0)
  free = tokens_of(inference.generate_batch(target, PROMPTS, max_new_tokens=16))
  # A stop token that row `r` first emits at j >= 8: with min_new_tokens=8 (which masks it
  # until then, in every row) row r still stops there.
  r, j = next((r, j) for r, row in enumerate(free) for j in range(8, 16)
              if row[j] not in row[:j])
  kwargs = dict(max_new_tokens=16, sampler=decoding.Greedy(), eos_id=free[r][j],
                min_new_tokens=8)
  ids = [inference.encode_prompt(target.tokenizer, p) for p in PROMPTS]
  plain = inference.generate_ids(target, ids, **kwargs)
  spec = inference.generate_ids(target, ids, draft=inference.self_draft(target, 2),
                                num_draft=3, **kwargs)
  for a, b in zip(plain, spec):
    assert (a[0].length, a[0].stopped) == (b[0].length, b[0].stopped)
    assert a[0].tokens[:a[0].length].tolist() == b[0].tokens[:b[0].length].tolist()
  assert (plain[r][0].length, plain[r][0].stopped) == (j + 1, True)


def test_a_draft_equal_to_the_target_has_every_token_accepted():
  target = model(TARGETS["llama"], 0)
  prompts, lengths = inference.pad_prompts(
      [inference.encode_prompt(target.tokenizer, p) for p in PROMPTS])
  for sampler in (decoding.Greedy(), decoding.Temperature(1.0)):
    result = inference.speculative_tokens(
        target.params, target.params, prompts, lengths, jax.random.key(0),
        model_config=target.config, draft_config=target.config, max_new_tokens=21,
        num_draft=4, sampler=sampler)
    assert int(result.accepted) == int(result.proposed) > 0
    assert int(result.iterations) == 4  # 1 token from the prefill, then 4 x (4 + 1)


V = 5  # a vocabulary small enough to enumerate every continuation
TINY = ModelConfig(family="llama", vocab_size=V, num_layers=2, num_heads=2, num_kv_heads=1,
                   width=16, max_length=16, use_bias=False, init_std=0.5)
TINY_DRAFT = dataclasses.replace(TINY, num_layers=1)


def tiny_params(config, seed):
  return nn.unbox(Decoder(config).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))
                  ["params"])


@pytest.mark.parametrize("sampler", [decoding.Temperature(1.0), decoding.TopK(3, 0.8),
                                     decoding.TopP(0.9, 2.0)], ids=["t1", "top_k", "top_p"])
def test_sampling_draws_from_the_targets_own_distribution(sampler):
  """20,000 draws of 4 tokens (the first from the prefill, the others from up to two
  speculative steps, which accept, refuse and take the bonus token) against the exact
  probabilities of the target's sampler over all 625 continuations."""
  target, draft = tiny_params(TINY, 0), tiny_params(TINY_DRAFT, 1)
  prompt, n_new, n = [1, 3], 4, 20000
  result = inference.speculative_tokens(
      target, draft, np.tile(np.asarray([prompt], np.int32), (n, 1)),
      np.full((n,), len(prompt), np.int32), jax.random.split(jax.random.key(5), n),
      model_config=TINY, draft_config=TINY_DRAFT, max_new_tokens=n_new, num_draft=2,
      sampler=sampler)
  accepted, proposed = int(result.accepted), int(result.proposed)
  assert 0 < accepted < proposed  # both branches of the rule ran
  drawn = np.asarray(result.tokens) @ (V ** np.arange(n_new)[::-1])
  counts = np.bincount(drawn, minlength=V ** n_new)
  continuations = np.asarray(list(itertools.product(range(V), repeat=n_new)), np.int32)
  sequences = np.concatenate([np.tile(np.asarray(prompt, np.int32), (len(continuations), 1)),
                              continuations], axis=1)
  logits = Decoder(TINY).apply({"params": target}, jnp.asarray(sequences))[0]
  log_probs = np.asarray(jax.nn.log_softmax(sampler.filtered(logits), axis=-1), np.float64)
  joint = sum(log_probs[np.arange(len(continuations)), len(prompt) - 1 + i, continuations[:, i]]
              for i in range(n_new))
  expected = np.exp(joint)
  expected = expected / expected.sum() * n
  assert counts[expected == 0].sum() == 0  # nothing outside the sampler's support
  big = expected >= 5  # the rest pooled into one cell
  observed = np.append(counts[big], counts[~big].sum())
  wanted = np.append(expected[big], expected[~big].sum())
  keep = wanted > 0
  assert big.sum() >= 10
  assert stats.chisquare(observed[keep], wanted[keep]).pvalue > 1e-3


def test_the_rule_is_needed_for_the_test_to_pass():
  """The chi-square above can fail: the draft's own samples (what speculative decoding
  would give with every token accepted) are rejected by it."""
  target, draft = tiny_params(TINY, 0), tiny_params(TINY_DRAFT, 1)
  n = 20000
  result = inference.generate_tokens(draft, np.tile(np.asarray([[1, 3]], np.int32), (n, 1)),
                                     np.full((n,), 2, np.int32),
                                     jax.random.split(jax.random.key(5), n),
                                     model_config=TINY_DRAFT, max_new_tokens=1,
                                     sampler=decoding.Temperature(1.0))
  counts = np.bincount(np.asarray(result.tokens[:, 0]), minlength=V)
  logits = Decoder(TINY).apply({"params": target}, jnp.asarray([[1, 3]]))[0]
  expected = np.asarray(jax.nn.softmax(logits[0, -1]), np.float64) * n
  assert stats.chisquare(counts, expected * counts.sum() / expected.sum()).pvalue < 1e-6


@pytest.mark.parametrize("change, message", [
    (dict(draft_vocab=7), "must share a tokenizer"),
    (dict(max_new_tokens=44), "speculative decoding is not windowed"),
    (dict(num_draft=0), "num_draft must be >= 1"),
    (dict(num_beams=2), "takes no beams"),
    (dict(stop=("ab",)), "stop strings"),
])
def test_bad_speculative_requests_are_refused_before_compiling(change, message):
  target = model(TARGETS["llama"], 0)
  vocab = change.pop("draft_vocab", None)
  draft = model(dataclasses.replace(TARGETS["llama"], num_layers=1), 1)
  if vocab:
    draft = dataclasses.replace(draft, config=dataclasses.replace(draft.config,
                                                                  vocab_size=vocab))
  request = {"max_new_tokens": 8, "num_draft": 3, **change}
  before = inference.speculative_tokens._cache_size()
  with pytest.raises(ConfigError, match=message):
    inference.generate_batch(target, PROMPTS, draft=draft, **request)
  assert inference.speculative_tokens._cache_size() == before


@pytest.mark.parametrize("layers", [0, 3])
def test_a_self_draft_takes_fewer_layers_than_the_model(layers):
  with pytest.raises(ConfigError, match="self-draft takes 1..2"):
    inference.self_draft(model(TARGETS["llama"], 0), layers)

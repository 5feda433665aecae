"""Beam search against greedy decoding, brute-force enumeration and a plain-Python beam
search, all scored by full forward passes without a cache."""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoder_jax import decoding, inference
from decoder_jax.decoding.beam_search import beam_search
from decoder_jax.model import Decoder, ModelConfig, init_cache

VOCAB = 5
CONFIGS = {
    "gpt2": ModelConfig(family="gpt2", vocab_size=VOCAB, num_layers=1, num_heads=2, width=8,
                        max_length=16),
    "llama": ModelConfig(family="llama", vocab_size=VOCAB, num_layers=1, num_heads=2,
                         num_kv_heads=1, width=8, max_length=16, use_bias=False),
    # Larger weights give peaked distributions, so eos decisions matter and the loop can stop
    # early.
    "llama_sharp": ModelConfig(family="llama", vocab_size=VOCAB, num_layers=1, num_heads=2,
                               num_kv_heads=1, width=8, max_length=16, use_bias=False,
                               init_std=0.5),
    "llama_scan": ModelConfig(family="llama", vocab_size=VOCAB, num_layers=2, num_heads=2,
                              num_kv_heads=1, width=8, max_length=16, use_bias=False,
                              scan_layers=True),
}
RAGGED_PROMPTS = [[3, 1, 4, 1, 2], [2], [1, 4, 2], [0, 3]]

# Decode steps (one token per beam) seen by the model, appended to at run time.
DECODE_CALLS = []


@functools.cache
def setup(name):
  config = CONFIGS[name]
  model = Decoder(config)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
  return model, params


def pad(prompts):
  """Right-padded prompts at their exact width (no bucket): ([batch, width], [batch])."""
  array, lengths = inference.pad_prompts(prompts, bucket=False)
  return jnp.asarray(array), jnp.asarray(lengths)


@functools.partial(jax.jit, static_argnames=("config", "num_beams", "max_new", "length_penalty",
                                             "eos_id", "min_new"))
def run_beam(config, params, prompts, lengths, *, num_beams, max_new, length_penalty=1.0,
             eos_id=None, min_new=0):
  model = Decoder(config)
  traced = []  # shapes seen while tracing: the first call is the prefill

  def tokens_to_logits(tokens, positions, cache):
    if traced:  # a decode step: count it each time it runs
      jax.debug.callback(lambda: DECODE_CALLS.append(1))
    traced.append(tokens.shape)
    return model.apply({"params": params}, tokens, positions=positions, cache=cache)

  cache = init_cache(config, prompts.shape[0], prompts.shape[1] + max_new)
  return beam_search(tokens_to_logits, cache, prompts, lengths, num_beams=num_beams,
                     max_new_tokens=max_new, length_penalty=length_penalty, eos_id=eos_id,
                     min_new_tokens=min_new, cache_batch_axis=1 if config.scan_layers else 0)


@functools.partial(jax.jit, static_argnums=(0, 4))
def run_greedy(config, params, prompts, lengths, max_new):
  model = Decoder(config)

  def tokens_to_logits(tokens, positions, cache):
    return model.apply({"params": params}, tokens, positions=positions, cache=cache)

  cache = init_cache(config, prompts.shape[0], prompts.shape[1] + max_new)
  return decoding.generate(tokens_to_logits, cache, prompts, lengths, max_new_tokens=max_new,
                           sampler=decoding.Greedy(), rng=jax.random.key(0))


@functools.partial(jax.jit, static_argnums=0)
def _full_log_probs(config, params, tokens):  # tokens [rows, max_length] -> [rows, max_length, V]
  logits, _ = Decoder(config).apply({"params": params}, tokens)
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def full_log_probs(name, prompt, continuations):
  """Log-probs [len(continuations), max_length, vocab] of prompt + each continuation, from
  forward passes without a cache. Rows are padded to max_length (causality makes the padding
  irrelevant) and run in chunks of a fixed size, so every call reuses one compilation."""
  config, rows = CONFIGS[name], 640
  out = []
  for start in range(0, max(len(continuations), 1), rows):
    buffer = np.zeros((rows, config.max_length), np.int32)
    for i, c in enumerate(continuations[start:start + rows]):
      buffer[i, :len(prompt) + len(c)] = list(prompt) + list(c)
    out.append(np.asarray(_full_log_probs(config, setup(name)[1], jnp.asarray(buffer))))
  return np.concatenate(out)[:len(continuations)]


def sum_logprobs(name, prompt, continuations):
  """Summed log-probability of each continuation after the prompt: float64 [n]."""
  lp = full_log_probs(name, prompt, continuations)
  return np.array([sum(float(lp[i, len(prompt) - 1 + t, tok]) for t, tok in enumerate(c))
                   for i, c in enumerate(continuations)])


def reference_beam_search(name, prompt, num_beams, max_new, length_penalty, eos_id, min_new):
  """Plain-Python beam search with Hugging Face's rules, always run to max_new tokens.

  Each step keeps the best 2 * num_beams extensions; of those, eos ones join the finished
  set (best num_beams by sum / length ** length_penalty) and the best num_beams others stay
  alive. At the end the alive beams join the finished set. Returns [(score, tokens)].
  """
  alive = [((), 0.0)]
  finished = []
  for step in range(max_new):
    lp = full_log_probs(name, prompt, [seq for seq, _ in alive])
    candidates = sorted(
        ((total + float(lp[i, len(prompt) - 1 + step, tok]), seq + (tok,))
         for i, (seq, total) in enumerate(alive) for tok in range(VOCAB)
         if not (tok == eos_id and step < min_new)), reverse=True)[:2 * num_beams]
    alive = [(seq, total) for total, seq in candidates if seq[-1] != eos_id][:num_beams]
    finished += [(total / (step + 1) ** length_penalty, seq)
                 for total, seq in candidates if seq[-1] == eos_id]
    finished = sorted(finished, reverse=True)[:num_beams]
  finished += [(total / max_new ** length_penalty, seq) for seq, total in alive]
  return sorted(finished, reverse=True)[:num_beams]


def check_beams(name, prompt, tokens, lengths, scores, length_penalty, eos_id, max_new):
  """Generic checks on one prompt's beams: sorted, padded, lengths and scores consistent."""
  assert np.all(np.diff(scores) <= 1e-6), scores
  hypotheses = []
  for beam, length in zip(tokens, lengths):
    assert 1 <= length <= max_new
    assert (beam[length:] == 0).all()
    hyp = beam[:length].tolist()
    if eos_id is not None:
      assert eos_id not in hyp[:-1]  # eos only ends a hypothesis
      assert length == max_new or hyp[-1] == eos_id
    hypotheses.append(hyp)
  assert len(set(map(tuple, hypotheses))) == len(hypotheses), "beams must be distinct"
  expected = sum_logprobs(name, prompt, hypotheses) / np.asarray(lengths) ** length_penalty
  np.testing.assert_allclose(scores, expected, atol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama", "llama_scan"])
def test_one_beam_equals_greedy(name):
  config = CONFIGS[name]
  _, params = setup(name)
  prompts, lengths = pad(RAGGED_PROMPTS)
  greedy = run_greedy(config, params, prompts, lengths, 8)
  beams = run_beam(config, params, prompts, lengths, num_beams=1, max_new=8)
  assert beams.tokens.shape == (4, 1, 8)
  np.testing.assert_array_equal(beams.tokens[:, 0], greedy.tokens)
  np.testing.assert_array_equal(beams.lengths[:, 0], [8] * 4)
  for row, prompt in enumerate(RAGGED_PROMPTS):
    expected = sum_logprobs(name, prompt, [greedy.tokens[row].tolist()]) / 8.0
    np.testing.assert_allclose(beams.scores[row], expected, atol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_enough_beams_find_the_best_of_all_continuations(name):
  config = CONFIGS[name]
  _, params = setup(name)
  max_new = 4
  prompts, lengths = pad(RAGGED_PROMPTS)
  every = [list(c) for c in itertools.product(range(VOCAB), repeat=max_new)]  # 625
  exact = run_beam(config, params, prompts, lengths, num_beams=125, max_new=max_new)
  small = run_beam(config, params, prompts, lengths, num_beams=8, max_new=max_new)
  for row, prompt in enumerate(RAGGED_PROMPTS):
    scores = sum_logprobs(name, prompt, every) / max_new  # length_penalty 1, all length 4
    order = np.argsort(-scores)
    assert exact.tokens[row, 0].tolist() == every[order[0]]
    # 125 >= 5**3 beams hold every 3-token prefix, so the whole top 125 is exact.
    np.testing.assert_allclose(exact.scores[row], scores[order[:125]], atol=1e-4)
    np.testing.assert_array_equal(exact.lengths[row], max_new)
    # Fewer beams: valid, distinct hypotheses, none better than the optimum.
    assert float(small.scores[row, 0]) <= scores[order[0]] + 1e-4
    check_beams(name, prompt, np.asarray(small.tokens[row]), np.asarray(small.lengths[row]),
                np.asarray(small.scores[row]), 1.0, None, max_new)


@pytest.mark.parametrize("length_penalty,min_new", [(0.5, 0), (0.0, 2)])
def test_eos_with_enough_beams_matches_brute_force(length_penalty, min_new):
  name, eos, max_new = "llama_sharp", 1, 4
  config = CONFIGS[name]
  _, params = setup(name)
  prompts, lengths = pad(RAGGED_PROMPTS)
  # Every hypothesis: eos-terminated (not before min_new tokens) or max_new tokens without eos.
  others = [t for t in range(VOCAB) if t != eos]
  hypotheses = [list(p) + [eos] for n in range(min_new, max_new)
                for p in itertools.product(others, repeat=n)]
  hypotheses += [list(p) for p in itertools.product(others, repeat=max_new)]
  result = run_beam(config, params, prompts, lengths, num_beams=125, max_new=max_new,
                    length_penalty=length_penalty, eos_id=eos, min_new=min_new)
  for row, prompt in enumerate(RAGGED_PROMPTS):
    hyp_lengths = np.array([len(h) for h in hypotheses])
    scores = sum_logprobs(name, prompt, hypotheses) / hyp_lengths ** length_penalty
    order = np.argsort(-scores)[:125]
    best = hypotheses[order[0]]
    assert result.tokens[row, 0, :len(best)].tolist() == best
    assert int(result.lengths[row, 0]) == len(best)
    np.testing.assert_allclose(result.scores[row], scores[order], atol=1e-4)
    np.testing.assert_array_equal(np.sort(result.lengths[row]), np.sort(hyp_lengths[order]))
    check_beams(name, prompt, np.asarray(result.tokens[row]), np.asarray(result.lengths[row]),
                np.asarray(result.scores[row]), length_penalty, eos, max_new)
  # Some hypotheses end early, none before min_new tokens and eos.
  assert min_new + 1 <= int(result.lengths.min()) < max_new


@pytest.mark.parametrize("eos,length_penalty,min_new", [(0, 0.0, 0), (0, 2.0, 2),
                                                        (None, 0.0, 0)])
def test_matches_reference_beam_search_and_stops_early(eos, length_penalty, min_new):
  name, num_beams, max_new = "llama_sharp", 3, 10
  _, params = setup(name)
  prompts, lengths = pad(RAGGED_PROMPTS)
  DECODE_CALLS.clear()
  result = jax.block_until_ready(
      run_beam(CONFIGS[name], params, prompts, lengths, num_beams=num_beams, max_new=max_new,
               length_penalty=length_penalty, eos_id=eos, min_new=min_new))
  steps = len(DECODE_CALLS)
  for row, prompt in enumerate(RAGGED_PROMPTS):
    reference = reference_beam_search(name, prompt, num_beams, max_new, length_penalty, eos,
                                      min_new)
    tokens, lens = np.asarray(result.tokens[row]), np.asarray(result.lengths[row])
    assert [tuple(t[:n]) for t, n in zip(tokens, lens)] == [seq for _, seq in reference]
    np.testing.assert_allclose(result.scores[row], [s for s, _ in reference], atol=1e-4)
    check_beams(name, prompt, tokens, lens, np.asarray(result.scores[row]), length_penalty,
                eos, max_new)
    assert (tokens[:, :min_new] != eos).all()
  if eos is None:  # nothing finishes: every beam runs the whole budget
    assert steps == max_new - 1
    np.testing.assert_array_equal(result.lengths, max_new)
  else:
    last = np.take_along_axis(np.asarray(result.tokens),
                              np.asarray(result.lengths)[:, :, None] - 1, axis=2)
    assert (last == eos).any(), "no hypothesis ended with eos"
  if eos is not None and length_penalty == 0:
    # Here every prompt's 3 finished hypotheses beat all alive beams early: the exact
    # stopping bound ends the loop before the budget (max_new - 1 decode steps), and the
    # beams still equal those of the reference, which always runs to the end.
    assert steps < max_new - 1, steps


# A Markov chain over tokens {0: eos, 1, 2, 3, 4}: row t holds the log-probs of the token after
# t. Prompt [3]: eos (-1.0), 1 (-1.1) or 2. Prompt [4]: eos (-1.5), 2 (-0.3) or 1. Then 1
# repeats itself surely and 2 is surely followed by eos.
_CHAIN = np.full((5, 5), -60.0, np.float32)
_CHAIN[3, :3] = [-1.0, -1.1, np.log(1 - np.exp(-1.0) - np.exp(-1.1))]
_CHAIN[4, :3] = [-1.5, np.log(1 - np.exp(-1.5) - np.exp(-0.3)), -0.3]
_CHAIN[1, 1] = _CHAIN[2, 0] = 0.0


@functools.partial(jax.jit, static_argnames=("length_penalty",))
def run_chain(prompt_token, *, length_penalty):
  def tokens_to_logits(tokens, positions, cache):
    jax.debug.callback(lambda: DECODE_CALLS.append(1))
    return jnp.asarray(_CHAIN)[tokens], cache  # [batch, T, 5]

  cache = {"unused": jnp.zeros((1, 3))}  # a cache leaf with one row per prompt
  return beam_search(tokens_to_logits, cache, jnp.full((1, 1), prompt_token), jnp.array([1]),
                     num_beams=1, max_new_tokens=4, length_penalty=length_penalty, eos_id=0)


@pytest.mark.parametrize("prompt,length_penalty,calls,tokens,score", [
    # The first step finishes [eos] (-1.0) and keeps [1] (sum -1.1) alive. With penalty 1,
    # [1, 1, 1, 1] will score -1.1 / 4 > -1.0, so the search must run on (Hugging Face's
    # old heuristic bound -1.1 / 1 < -1.0 would stop and return [eos]).
    (3, 1.0, 1 + 3, [1, 1, 1, 1], -1.1 / 4),
    # Penalty 0: growing only lowers a sum, nothing alive can beat -1.0: stop after prefill.
    (3, 0.0, 1, [0], -1.0),
    # Penalty -2 favours short: [eos] scores -1.5, [2] (sum -0.3) alive can still reach
    # -0.3 * 2**2 = -1.2 > -1.5, so one more step (a bound at the budget's length,
    # -0.3 * 4**2, would stop and return the unfinished [2]).
    (4, -2.0, 1 + 1, [2, 0], -0.3 * 4),
])
def test_stopping_rule_is_exact(prompt, length_penalty, calls, tokens, score):
  DECODE_CALLS.clear()
  result = jax.block_until_ready(run_chain(prompt, length_penalty=length_penalty))
  assert len(DECODE_CALLS) == calls  # prefill and decode steps
  assert int(result.lengths[0, 0]) == len(tokens)
  assert result.tokens[0, 0].tolist() == tokens + [0] * (4 - len(tokens))
  np.testing.assert_allclose(result.scores[0, 0], score, atol=1e-5)


def _never_called(tokens, positions, cache):
  raise AssertionError("validation must happen before the model is called")


@pytest.mark.parametrize("kwargs,prompts,match", [
    (dict(num_beams=0, max_new_tokens=4), np.zeros((2, 3), np.int32), "num_beams"),
    (dict(num_beams=2, max_new_tokens=0), np.zeros((2, 3), np.int32), "max_new_tokens"),
    (dict(num_beams=2, max_new_tokens=4, min_new_tokens=-1), np.zeros((2, 3), np.int32),
     "min_new_tokens"),
    (dict(num_beams=2, max_new_tokens=4, min_new_tokens=5), np.zeros((2, 3), np.int32),
     "min_new_tokens"),
    (dict(num_beams=2, max_new_tokens=4), np.zeros((3,), np.int32), "2-D"),
    (dict(num_beams=2, max_new_tokens=4, cache_batch_axis=1), np.zeros((2, 3), np.int32),
     "cache_batch_axis"),
])
def test_validation(kwargs, prompts, match):
  cache = init_cache(CONFIGS["llama"], 2, 7)
  with pytest.raises(ValueError, match=match):
    beam_search(_never_called, cache, jnp.asarray(prompts), jnp.array([3, 1], jnp.int32),
                **kwargs)

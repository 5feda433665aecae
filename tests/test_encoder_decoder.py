"""The encoder-decoder: cached decoding against the full forward pass, padding, sharding,
config checks."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from decoder_jax import decoding, seq2seq, sharding
from decoder_jax.errors import ConfigError
from decoder_jax.model.config import ModelConfig
from decoder_jax.model.encoder_decoder import EncoderDecoder, init_decoding_cache

BOS, EOS = 1, 2
VARIANTS = {
    "gpt2-prenorm-shared": dict(family="gpt2"),
    "llama-postnorm-separate-untied": dict(family="llama", num_kv_heads=2, post_norm=True,
                                           separate_source_embeddings=True,
                                           tie_embeddings=False),
}


def tiny(**overrides) -> ModelConfig:
  values = dict(vocab_size=40, num_layers=2, encoder_layers=2, num_heads=4, width=32,
                max_length=24, init_std=0.3)  # a large init: peaked, decisive logits
  values.update(overrides)
  return ModelConfig(**values)


def sources():
  """Three right-padded sources of lengths 6, 3 and 1 (padding: token 9, never seen)."""
  source = np.full((3, 6), 9, np.int32)
  rng = np.random.default_rng(0)
  for row, n in enumerate((6, 3, 1)):
    source[row, :n] = rng.integers(3, 40, n)
  return jnp.asarray(source), jnp.asarray([6, 3, 1], jnp.int32)


def init(config):
  source, lengths = sources()
  tokens = jnp.zeros((3, 4), jnp.int32)
  return nn.unbox(EncoderDecoder(config).init(jax.random.key(1), source, tokens,
                                              source_lengths=lengths))["params"]


def full_logits(config, params, source, lengths, tokens):
  logits, _ = EncoderDecoder(config).apply({"params": params}, source, jnp.asarray(tokens),
                                           source_lengths=lengths)
  return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))  # [batch, T, vocab]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_greedy_equals_full_forward_at_every_step(variant):
  config = tiny(**VARIANTS[variant])
  params = init(config)
  source, lengths = sources()
  steps = 8
  result = seq2seq.generate_tokens(params, source, lengths, jax.random.key(0),
                                   model_config=config, max_new_tokens=steps,
                                   sampler=decoding.Greedy(), bos_id=BOS, eos_id=None)
  generated = np.asarray(result.tokens)  # [3, steps]
  assert (np.asarray(result.lengths) == steps).all()
  prefix = np.concatenate([np.full((3, 1), BOS), generated], axis=1)  # [3, 1 + steps]
  logprobs = full_logits(config, params, source, lengths, prefix[:, :steps])  # [3, steps, V]
  for t in range(steps):  # step t's token is the argmax of the uncached pass over BOS + 0..t-1
    np.testing.assert_array_equal(generated[:, t], logprobs[:, t].argmax(-1), err_msg=f"step {t}")
    np.testing.assert_allclose(np.asarray(result.logprobs[:, t]),
                               logprobs[np.arange(3), t, generated[:, t]], atol=1e-4)
  assert len({tuple(r) for r in generated}) > 1  # the sources lead to different outputs


def test_source_padding_is_invisible():
  config = tiny()
  params = init(config)
  source, lengths = sources()
  tokens = np.array([[BOS, 5, 6], [BOS, 7, 8], [BOS, 3, 4]])
  padded = jnp.concatenate([source, jnp.full((3, 5), 17, jnp.int32)], axis=1)
  np.testing.assert_allclose(full_logits(config, params, source, lengths, tokens),
                             full_logits(config, params, padded, lengths, tokens), atol=1e-5)
  # ... while the real tokens do matter
  changed = source.at[1, 0].set(int(source[1, 0]) % 30 + 4)
  assert not np.allclose(full_logits(config, params, source, lengths, tokens)[1],
                         full_logits(config, params, changed, lengths, tokens)[1], atol=1e-3)


def test_prefill_and_one_token_steps_match_the_full_pass():
  config = tiny(family="llama", num_kv_heads=2)
  params = init(config)
  source, lengths = sources()
  model = EncoderDecoder(config)
  tokens = jnp.asarray(np.random.default_rng(2).integers(3, 40, (3, 6)), jnp.int32)
  expected = full_logits(config, params, source, lengths, tokens)
  part = model.apply({"params": params}, source, None, source_lengths=lengths, encode_only=True)
  cache = init_decoding_cache(config, part, 8, jnp.float32)
  logits, cache = model.apply({"params": params}, None, tokens[:, :4], cache=cache,
                              empty_cache=True)
  got = [np.asarray(jax.nn.log_softmax(logits))]
  for t in (4, 5):
    logits, cache = model.apply({"params": params}, None, tokens[:, t:t + 1],
                                positions=jnp.full((3, 1), t, jnp.int32), cache=cache)
    got.append(np.asarray(jax.nn.log_softmax(logits)))
  np.testing.assert_allclose(np.concatenate(got, axis=1), expected, atol=1e-5)


def test_beam_search_scores_are_full_forward_log_probabilities():
  config = tiny()
  params = init(config)
  source, lengths = sources()
  beams = seq2seq.beam_search_tokens(params, source, lengths, model_config=config,
                                     num_beams=3, max_new_tokens=5, bos_id=BOS, eos_id=EOS,
                                     length_penalty=0.0)
  greedy = seq2seq.generate_tokens(params, source, lengths, jax.random.key(0),
                                   model_config=config, max_new_tokens=5,
                                   sampler=decoding.Greedy(), bos_id=BOS, eos_id=EOS)
  for row in range(3):
    best = np.asarray(beams.tokens[row, 0, :int(beams.lengths[row, 0])])
    prefix = np.concatenate([[BOS], best[:-1]])[None]
    row_logprobs = full_logits(config, params, source[row:row + 1], lengths[row:row + 1],
                               prefix)[0]
    total = row_logprobs[np.arange(len(best)), best].sum()
    np.testing.assert_allclose(float(beams.scores[row, 0]), total, atol=1e-4)
    # the beam is at least as probable as the greedy continuation
    greedy_sum = float(np.asarray(greedy.logprobs[row, :int(greedy.lengths[row])]).sum())
    assert total >= greedy_sum - 1e-4


def test_every_parameter_has_logical_axes_the_rules_map():
  config = tiny(family="llama", num_kv_heads=2, separate_source_embeddings=True,
                tie_embeddings=False)
  source, lengths = sources()
  boxed = jax.eval_shape(lambda: EncoderDecoder(config).init(
      jax.random.key(0), source, jnp.zeros((3, 4), jnp.int32)))["params"]
  known = {name for name, _ in sharding.LOGICAL_AXIS_RULES}
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for leaf in leaves:
    assert set(n for n in leaf.names if n is not None) <= known, leaf.names
  specs = sharding.shardings_for(boxed, sharding.make_mesh({a: 1 for a in sharding.MESH_AXES}, jax.devices()[:1]))
  query = specs["decoder_block_0"]["cross_attn"]["query"]["kernel"]
  assert query.spec == P(*nn.logical_to_mesh_axes(("embed", "heads", "kv"),
                                                  sharding.LOGICAL_AXIS_RULES))
  names = set(boxed)
  assert {"embed", "source_embed", "lm_head", "encoder_block_1", "decoder_block_1",
          "encoder_norm", "decoder_norm"} <= names


def test_post_norm_has_no_final_norms_and_shared_embeddings_one_table():
  params = init(tiny(post_norm=True))
  assert "encoder_norm" not in params and "decoder_norm" not in params
  assert "source_embed" not in params and "lm_head" not in params
  assert set(params["decoder_block_0"]) == {"attn", "attn_norm", "cross_attn", "cross_norm",
                                            "mlp", "mlp_norm"}


@pytest.mark.parametrize("overrides, message", [
    (dict(encoder_layers=-1), "encoder_layers must be an integer >= 0"),
    (dict(encoder_layers=0, post_norm=True), "are for encoder-decoders"),
    (dict(scan_layers=True), "scan_layers is not supported on an encoder-decoder"),
    (dict(lora=dict(rank=2)), "lora is not supported on an encoder-decoder"),
])
def test_bad_encoder_decoder_configs_are_one_line_errors(overrides, message):
  with pytest.raises(ConfigError, match=message):
    tiny(**overrides)


def test_translate_ids_orders_and_pads_chunks_back_in_place():
  config = tiny()
  params = init(config)

  class Vocab:
    bos_id, eos_id = BOS, EOS

  trained = seq2seq.inference.TrainedModel(config, params, Vocab())
  lists = [[5, 6, 7, 2], [8, 2], [9, 10, 11, 12, 13, 2]]
  together = seq2seq.translate_ids(trained, lists, max_new_tokens=6, batch_size=2)
  alone = [seq2seq.translate_ids(trained, [ids], max_new_tokens=6, batch_size=1)[0]
           for ids in lists]
  assert together == alone
  assert all(EOS not in ids for ids in together)
  with pytest.raises(ConfigError, match="does not fit"):
    seq2seq.translate_ids(trained, lists, max_new_tokens=24)
  with pytest.raises(ConfigError, match="start token"):
    seq2seq.translate_ids(dataclasses.replace(trained, tokenizer=object()), lists,
                          max_new_tokens=4)

"""Both model families: shapes, causality, KV-cache equivalence, config validation."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoder_jax.model import Decoder, ModelConfig, init_cache

FAMILIES = {
    "gpt2": dict(family="gpt2"),
    "llama_gqa": dict(family="llama", num_kv_heads=2, use_bias=False),
    "llama_scan_remat": dict(family="llama", num_kv_heads=1, scan_layers=True, remat=True),
    "gpt2_untied": dict(family="gpt2", tie_embeddings=False, use_bias=False),
}
# The written-out attention: equal to the others (below), so only its cache path is added.
CACHED = {**FAMILIES, "llama_gqa_einsum": dict(family="llama", num_kv_heads=2, use_bias=False,
                                               attention_impl="einsum")}


def tiny(**fields) -> ModelConfig:
  return ModelConfig(**{**dict(vocab_size=23, num_layers=2, num_heads=4, width=32,
                               max_length=24), **fields})


def init(config, batch=3, length=12, seed=0):
  model = Decoder(config)
  tokens = jax.random.randint(jax.random.key(seed), (batch, length), 0, config.vocab_size)
  params = nn.unbox(model.init(jax.random.key(seed + 1), tokens)["params"])
  return model, params, tokens


@pytest.mark.parametrize("fields", FAMILIES.values(), ids=FAMILIES.keys())
def test_output_shape_and_finite(fields):
  model, params, tokens = init(tiny(**fields))
  logits, cache = model.apply({"params": params}, tokens)
  assert logits.shape == (3, 12, 23)
  assert cache is None
  assert bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize("fields", FAMILIES.values(), ids=FAMILIES.keys())
def test_causality(fields):
  model, params, tokens = init(tiny(**fields))
  t = 7
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % 23)
  before, _ = model.apply({"params": params}, tokens)
  after, _ = model.apply({"params": params}, changed)
  np.testing.assert_array_equal(np.asarray(before[:, :t]), np.asarray(after[:, :t]))
  assert not np.allclose(before[:, t:], after[:, t:])  # the change is visible from t on


@pytest.mark.parametrize("fields", CACHED.values(), ids=CACHED.keys())
def test_cached_prefill_and_steps_match_full_forward(fields):
  config = tiny(**fields)
  model, params, tokens = init(config)
  full, _ = model.apply({"params": params}, tokens)
  cache = init_cache(config, 3, 16)
  logits, cache = model.apply({"params": params}, tokens[:, :5], cache=cache)
  pieces = [logits]
  for t in range(5, 12):
    step_logits, cache = model.apply({"params": params}, tokens[:, t:t + 1],
                                     positions=jnp.full((3, 1), t, jnp.int32), cache=cache)
    pieces.append(step_logits)
  np.testing.assert_allclose(np.concatenate(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_parameter_names_and_shapes():
  _, params, _ = init(tiny(family="llama", num_kv_heads=2))
  block = params["block_0"]
  assert block["attn"]["query"]["kernel"].shape == (32, 4, 8)
  assert block["attn"]["key"]["kernel"].shape == (32, 2, 8)
  assert set(block["mlp"]) == {"gate", "up", "down"}
  assert "pos_embed" not in params  # RoPE: no learned position table
  _, gpt_params, _ = init(tiny(family="gpt2"))
  assert gpt_params["pos_embed"].shape == (24, 32)
  assert "lm_head" not in gpt_params  # tied embeddings


def test_bfloat16_compute_keeps_float32_params():
  model, params, tokens = init(tiny(dtype="bfloat16"))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  logits, _ = model.apply({"params": params}, tokens)
  assert logits.dtype == jnp.bfloat16


@pytest.mark.parametrize("fields, message", [
    (dict(width=30, num_heads=4), "divisible by model.num_heads"),
    (dict(num_heads=4, num_kv_heads=3), "divisible by model.num_kv_heads"),
    (dict(family="mamba"), "model.family"),
    (dict(dropout=1.5), "dropout"),
])
def test_bad_config_is_a_clear_error(fields, message):
  with pytest.raises(ValueError, match=message):
    tiny(**fields)


def test_unknown_field_is_rejected():
  with pytest.raises(ValueError, match="unknown model config field"):
    ModelConfig.from_dict({"widht": 32})


def test_einsum_attention_equals_dot_product_attention_with_equal_gradients():
  config = tiny(family="llama", num_kv_heads=2, use_bias=False)
  model, params, tokens = init(config)
  einsum_model = Decoder(dataclasses.replace(config, attention_impl="einsum"))

  def loss(m, p):
    logits, _ = m.apply({"params": p}, tokens)
    return (logits * jnp.linspace(-1.0, 1.0, logits.size).reshape(logits.shape)).sum()

  np.testing.assert_allclose(einsum_model.apply({"params": params}, tokens)[0],
                             model.apply({"params": params}, tokens)[0], atol=1e-5)
  grads = jax.grad(lambda p: loss(model, p))(params)
  einsum_grads = jax.grad(lambda p: loss(einsum_model, p))(params)
  for a, b in zip(jax.tree.leaves(einsum_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_auto_attention_uses_cudnn_only_where_it_applies():
  from decoder_jax.model.attention import resolve_implementation
  assert resolve_implementation("auto", "bfloat16", 64, backend="gpu") == "cudnn"
  assert resolve_implementation("auto", "float32", 64, backend="gpu") == "xla"  # fp32: no cuDNN
  assert resolve_implementation("auto", "bfloat16", 256, backend="gpu") == "xla"  # head too big
  assert resolve_implementation("auto", "bfloat16", 60, backend="gpu") == "xla"
  assert resolve_implementation("auto", "bfloat16", 64, backend="cpu") == "xla"
  assert resolve_implementation("cudnn", "float32", 64, backend="cpu") == "cudnn"  # explicit

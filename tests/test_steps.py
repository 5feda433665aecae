"""Train-step numerics: the chunked loss equals the plain one (values and gradients), and
every remat policy gives the same gradients as none."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoder_jax.model import Decoder, ModelConfig
from decoder_jax.train import steps

CONFIGS = {
    "gpt2_tied": dict(family="gpt2", vocab_size=97, num_layers=2, num_heads=4, width=32,
                      max_length=32),
    "llama_untied": dict(family="llama", vocab_size=97, num_layers=2, num_heads=4,
                         num_kv_heads=2, width=32, max_length=32, use_bias=False,
                         tie_embeddings=False),
}


def setup(fields, **overrides):
  config = ModelConfig(**{**fields, **overrides})
  model = Decoder(config)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  tokens = np.random.default_rng(1).integers(0, 97, (3, 13)).astype(np.int32)
  weights = np.ones((3, 12), np.float32)
  weights[:, :4] = 0.0
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}
  return model, params, batch


def mean_loss(model, params, batch, chunk_size=None):
  total, weight = steps.loss_sums(model, params, batch, chunk_size=chunk_size)
  return total / weight


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("chunk_size", [5, 36])  # 36 tokens: uneven chunks, one chunk
def test_chunked_loss_equals_plain_loss_with_equal_gradients(name, chunk_size):
  model, params, batch = setup(CONFIGS[name])
  plain, plain_grads = jax.value_and_grad(lambda p: mean_loss(model, p, batch))(params)
  chunked, chunked_grads = jax.value_and_grad(
      lambda p: mean_loss(model, p, batch, chunk_size))(params)
  assert float(chunked) == pytest.approx(float(plain), abs=1e-5)
  per_token = steps.token_losses(model, params, batch)
  np.testing.assert_allclose(steps.token_losses(model, params, batch, chunk_size=chunk_size),
                             per_token, atol=1e-5)
  for a, b in zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_label_word_loss_scores_only_the_answer_position():
  """A batch with answer_index (one weighted target per row) gives the loss and gradients
  of the full per-token loss, from [batch, vocab] logits instead of [batch, length, vocab].
  Llama with tied embeddings, as SmolLM2."""
  model, params, batch = setup(CONFIGS["llama_untied"], tie_embeddings=True)
  answer_index = np.array([4, 11, 7], np.int32)
  weights = np.zeros_like(batch["weights"])
  weights[np.arange(3), answer_index] = [1.0, 1.0, 0.0]  # the last row is padding
  full = dict(batch, weights=weights)
  scored = dict(full, answer_index=answer_index)
  plain, plain_grads = jax.value_and_grad(lambda p: mean_loss(model, p, full))(params)
  answer, answer_grads = jax.value_and_grad(lambda p: mean_loss(model, p, scored))(params)
  assert float(answer) == pytest.approx(float(plain), abs=1e-6)
  for a, b in zip(jax.tree.leaves(answer_grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  hlo = jax.jit(lambda p: mean_loss(model, p, scored)).lower(params).as_text()
  assert "tensor<3x12x97xf32>" not in hlo and "tensor<3x97xf32>" in hlo


def test_chunked_loss_never_builds_full_logits():
  """The compiled chunked loss holds no [tokens, vocab] array: every vocab-sized
  intermediate is at most a chunk's."""
  model, params, batch = setup(CONFIGS["gpt2_tied"], vocab_size=4099)
  batch = dict(batch, targets=batch["targets"] % 4099)
  plain = jax.jit(jax.grad(lambda p: mean_loss(model, p, batch))).lower(params).as_text()
  chunked = jax.jit(jax.grad(lambda p: mean_loss(model, p, batch, 4))).lower(params).as_text()
  assert "tensor<3x12x4099xf32>" in plain  # the plain loss does build full logits
  assert "tensor<4x4099xf32>" in chunked  # chunk logits exist...
  assert "3x12x4099x" not in chunked and "36x4099x" not in chunked  # ...never all tokens


@pytest.mark.parametrize("policy", ["dots_saveable", "full"])
def test_remat_policies_give_the_same_gradients(policy):
  fields = {**CONFIGS["llama_untied"], "scan_layers": True}
  model, params, batch = setup(fields)
  rematted, _, _ = setup(fields, remat=policy)
  grads = jax.grad(lambda p: mean_loss(model, p, batch))(params)
  remat_grads = jax.grad(lambda p: mean_loss(rematted, p, batch))(params)
  for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_remat_accepts_old_booleans_and_rejects_unknown_policies():
  assert ModelConfig(remat=True).remat == "full" and ModelConfig(remat=False).remat == "none"
  with pytest.raises(ValueError, match="model.remat must be one of"):
    ModelConfig(remat="sometimes")

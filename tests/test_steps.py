"""Train-step numerics: the chunked loss equals the plain one (values and gradients),
every remat policy gives the same gradients as none, and the flat gradient all-reduce
trains like the sharded step."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from decoder_jax.model import Decoder, ModelConfig
from decoder_jax import losses, sharding
from decoder_jax.train import steps
from decoder_jax.train import state as state_lib

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
  total, weight = losses.loss_sums(model, params, batch, chunk_size=chunk_size)
  return total / weight


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("chunk_size", [5, 36])  # 36 tokens: uneven chunks, one chunk
def test_chunked_loss_equals_plain_loss_with_equal_gradients(name, chunk_size):
  model, params, batch = setup(CONFIGS[name])
  plain, plain_grads = jax.value_and_grad(lambda p: mean_loss(model, p, batch))(params)
  chunked, chunked_grads = jax.value_and_grad(
      lambda p: mean_loss(model, p, batch, chunk_size))(params)
  assert float(chunked) == pytest.approx(float(plain), abs=1e-5)
  per_token = losses.token_losses(model, params, batch)
  np.testing.assert_allclose(losses.token_losses(model, params, batch, chunk_size=chunk_size),
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


def data_parallel_run(step_fn, params, batch, mesh, num_steps=2):
  """num_steps of step_fn on `mesh`, every array replicated but the batch: (final params,
  [metrics], compiled HLO text)."""
  whole, rows = NamedSharding(mesh, P()), sharding.batch_sharding(mesh)
  tx = optax.adamw(1e-2)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params), tx=tx)
  jitted = jax.jit(step_fn, in_shardings=(whole, whole, rows, whole),
                   out_shardings=(whole, whole))
  metrics = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    compiled = jitted.lower(state, {}, batch, jax.random.key(3)).compile()  # run and read
    for _ in range(num_steps):
      state, m = compiled(state, {}, batch, jax.random.key(3))
      metrics.append(jax.device_get(m))
  return state.params, metrics, compiled.as_text()


def data_mesh(num_devices):
  return sharding.make_mesh(dict(data=num_devices, fsdp=1, tensor=1),
                            jax.devices()[:num_devices])


@pytest.mark.parametrize("accum", [1, 2])
def test_flat_gradient_allreduce_trains_like_the_sharded_step(accum):
  model, params, _ = setup(CONFIGS["llama_untied"])
  tokens = np.random.default_rng(2).integers(0, 97, (8, 13)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  mesh = data_mesh(4)
  plain = steps.make_train_step(model, accum, dropout=False)
  flat = steps.make_train_step(model, accum, dropout=False, flat_allreduce_mesh=mesh)
  want_params, want_metrics, _ = data_parallel_run(plain, params, batch, mesh)
  got_params, got_metrics, hlo = data_parallel_run(flat, params, batch, mesh)
  for got, want in zip(got_metrics, want_metrics):
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
    np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-5)
  # Adam divides each gradient by its running magnitude, so an element whose gradient is
  # near zero turns the two programs' different summation orders into an update that
  # differs by up to ~3e-6 (seen on an AMD EPYC: 1 element of 4096, accum=2), 0.03% of one
  # lr=1e-2 step.
  for got, want in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(got, want, atol=1e-5)
  # One all-reduce, carrying every gradient as one float32 vector.
  reduces = [line for line in hlo.splitlines() if re.search(r"= .* all-reduce(-start)?\(", line)]
  num_params = sum(x.size for x in jax.tree.leaves(params))
  assert len(reduces) == 1 and f"f32[{num_params}]" in reduces[0], reduces


def test_flat_gradient_allreduce_draws_other_dropout_masks_on_each_device():
  # The batch's two halves are the same rows. Had both devices drawn the same masks, the
  # two-device loss would equal the one-device loss of one half (device index 0 on both).
  model, params, _ = setup(CONFIGS["gpt2_tied"], dropout=0.5)
  tokens = np.random.default_rng(2).integers(0, 97, (2, 13)).astype(np.int32)
  half = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  doubled = jax.tree.map(lambda x: np.concatenate([x, x]), half)
  losses = {}
  for name, batch, mesh in [("one", half, data_mesh(1)), ("two", doubled, data_mesh(2))]:
    step = steps.make_train_step(model, 1, dropout=True, flat_allreduce_mesh=mesh)
    losses[name] = data_parallel_run(step, params, batch, mesh, num_steps=1)[1][0]["loss"]
  assert np.isfinite(losses["two"]) and abs(losses["two"] - losses["one"]) > 1e-4, losses


def test_flat_gradient_allreduce_refuses_sharded_parameters():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=1), jax.devices()[:4])
  with pytest.raises(ValueError, match="needs a data-parallel mesh.*fsdp.*flat_grad_allreduce=False"):
    steps.make_train_step(None, 1, dropout=False, flat_allreduce_mesh=mesh)

"""Pure train and eval steps. The loop jit-compiles them with shardings and donation.

Parameters come in two halves: `state.params`, the trainable ones (all of them for full
training; LoRA adapters and a classification head for LoRA), and `frozen`, the rest
(an empty dict for full training). Only the trainable half is differentiated, so the
frozen base has neither gradients nor optimizer state.

The batch decides the objective: a batch with `last_index` trains the classification
head (cross-entropy over labels, one example per row); a batch with `answer_index`
(label words) has one weighted target per row, so only that position's logits are
computed; any other is language modelling (per-token cross-entropy, weighted by
`weights` when the batch has them: 0 on prompts and padding).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec as P

from decoder_jax.errors import ConfigError
from decoder_jax.peft import combine
from decoder_jax.sharding import BATCH_AXES


def token_losses(model, params, batch, rng=None, deterministic=True, chunk_size=None):
  """Per-token cross-entropy in float32: [batch, length].

  With `chunk_size`, the output projection and the cross-entropy run over chunks of
  `chunk_size` tokens under jax.checkpoint, so neither pass holds more than
  [chunk_size, vocab] logits (the backward pass recomputes each chunk's).
  """
  rngs = None if deterministic else {"dropout": rng}
  if not chunk_size:
    logits, _ = model.apply({"params": params}, batch["inputs"], deterministic=deterministic,
                            rngs=rngs)  # [batch, length, vocab]
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           batch["targets"])
  hidden, _ = model.apply({"params": params}, batch["inputs"], deterministic=deterministic,
                          rngs=rngs, return_hidden=True)  # [batch, length, embed]
  return chunked_token_losses(hidden, output_matrix(model.config, params), batch["targets"],
                              chunk_size, jnp.dtype(model.config.dtype))


def output_matrix(config, params):
  """The LM head as [embed, vocab]: the tied embedding table's transpose or lm_head."""
  lora = config.lora
  if not config.tie_embeddings and lora is not None and lora.is_target(("lm_head",)):
    raise ConfigError("train.loss_chunk_size does not support LoRA on lm_head; merge or "
                      "untarget it")
  if config.tie_embeddings:
    return params["embed"]["embedding"].T
  return params["lm_head"]["kernel"]


def chunked_token_losses(hidden, matrix, targets, chunk_size: int, dtype):
  """hidden [batch, length, embed] @ matrix [embed, vocab] -> cross-entropy [batch, length],
  chunk by chunk over the flattened tokens."""
  batch, length, width = hidden.shape
  tokens = batch * length
  chunks = -(-tokens // chunk_size)
  pad = chunks * chunk_size - tokens
  flat_hidden = jnp.pad(hidden.reshape(tokens, width), ((0, pad), (0, 0)))
  flat_targets = jnp.pad(targets.reshape(tokens), (0, pad))

  @jax.checkpoint
  def one_chunk(args):
    h, t = args  # [chunk, embed], [chunk]
    logits = (h.astype(dtype) @ matrix.astype(dtype)).astype(jnp.float32)  # [chunk, vocab]
    return optax.softmax_cross_entropy_with_integer_labels(logits, t)

  losses = jax.lax.map(one_chunk, (flat_hidden.reshape(chunks, chunk_size, width),
                                   flat_targets.reshape(chunks, chunk_size)))
  return losses.reshape(-1)[:tokens].reshape(batch, length)


def class_logits(model, params, batch, rng=None, deterministic=True):
  """Classification-head logits at each row's last_index: float32 [batch, num_labels]."""
  rngs = None if deterministic else {"dropout": rng}
  logits, _ = model.apply({"params": params}, batch["inputs"], deterministic=deterministic,
                          rngs=rngs, last_index=batch["last_index"])
  return logits


def answer_logits(model, params, batch, rng=None, deterministic=True):
  """Token logits at each row's answer_index only: float32 [batch, vocab]."""
  rngs = None if deterministic else {"dropout": rng}
  logits, _ = model.apply({"params": params}, batch["inputs"], deterministic=deterministic,
                          rngs=rngs, logits_at=batch["answer_index"])
  return logits.astype(jnp.float32)


def at_answer(batch, key):
  """batch[key] [batch, length] at each row's answer_index: [batch]."""
  values = jnp.asarray(batch[key])
  return values[jnp.arange(values.shape[0]), batch["answer_index"]]


def loss_sums(model, params, batch, rng=None, deterministic=True, chunk_size=None):
  """(sum of weighted losses, sum of weights) of a batch, whatever its objective."""
  if "last_index" in batch:
    losses = optax.softmax_cross_entropy_with_integer_labels(
        class_logits(model, params, batch, rng, deterministic), batch["labels"])  # [batch]
  elif "answer_index" in batch:
    # Label words: the answer position is the only weighted target of a row (the
    # response is one token), so the [batch, length, vocab] logits would be wasted.
    losses = optax.softmax_cross_entropy_with_integer_labels(
        answer_logits(model, params, batch, rng, deterministic),
        at_answer(batch, "targets"))  # [batch]
    weights = at_answer(batch, "weights")  # [batch]
    return (losses * weights).sum(), weights.sum()
  else:
    losses = token_losses(model, params, batch, rng, deterministic,
                          chunk_size)  # [batch, length]
  weights = batch.get("weights")
  if weights is None:
    weights = jnp.ones_like(losses)
  return (losses * weights).sum(), weights.sum()


def make_train_step(model, grad_accum_steps: int, dropout: bool,
                    loss_chunk_size: int | None = None, flat_allreduce_mesh=None,
                    regularizer=None):
  """state, frozen, batch, rng -> (state, metrics).

  `loss_chunk_size`: compute the LM loss in chunks of that many tokens (see
  token_losses) instead of materialising [batch, length, vocab] logits.

  The loss is the weighted mean over the whole batch. With gradient accumulation the
  batch is split into `grad_accum_steps` micro-batches under a lax.scan (memory holds one
  micro-batch); their loss sums and gradients of sums are added and divided by the total
  weight once, so the result equals the single-batch step.

  `flat_allreduce_mesh`: a data-parallel mesh (see summed_over_devices) on which each
  device computes its share and the gradients are summed as one flat vector.

  `regularizer` (trainable params -> scalar, e.g. AdaLoRA's orthogonality penalty) is
  added to the mean loss (each micro-batch adds it times its weight, so the sums still
  divide into mean + regularizer); the "loss" metric includes it.
  """

  def loss_sum_fn(trainable, frozen, micro_batch, rng):
    total, weight = loss_sums(model, combine(trainable, frozen), micro_batch, rng,
                              deterministic=not dropout, chunk_size=loss_chunk_size)
    if regularizer is not None:
      total = total + weight * regularizer(trainable)
    return total, weight

  grad_fn = jax.value_and_grad(loss_sum_fn, has_aux=True)

  def sums_and_grads(params, frozen, batch, rng):  # -> ((loss sum, weight sum), grads of sum)
    if grad_accum_steps == 1:
      return grad_fn(params, frozen, batch, rng)
    micro = jax.tree.map(
        lambda x: x.reshape((grad_accum_steps, -1) + x.shape[1:]), batch)  # [accum, micro, ...]

    def accumulate(carry, inputs):
      index, micro_batch = inputs
      (total, weight), grads = grad_fn(params, frozen, micro_batch,
                                       jax.random.fold_in(rng, index))
      return jax.tree.map(jnp.add, carry, (total, weight, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
             jax.tree.map(jnp.zeros_like, params))
    (total, weight, grads), _ = jax.lax.scan(accumulate, zeros,
                                             (jnp.arange(grad_accum_steps), micro))
    return (total, weight), grads

  if flat_allreduce_mesh is not None:
    sums_and_grads = summed_over_devices(sums_and_grads, flat_allreduce_mesh)

  def train_step(state, frozen, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    (total, weight), grads = sums_and_grads(state.params, frozen, batch, rng)
    weight = jnp.maximum(weight, 1.0)
    # Back in each parameter's dtype: a float32 weight would otherwise promote bfloat16
    # gradients, and with them the optimizer state, changing the state's types after step 1.
    loss = total / weight
    grads = jax.tree.map(lambda g, p: (g / weight).astype(p.dtype), grads, state.params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return state.apply_gradients(grads), metrics

  return train_step


def check_data_parallel(mesh) -> None:
  """Raises unless `mesh` is purely data-parallel (fsdp and tensor axes of size 1)."""
  sharded = {a: mesh.shape[a] for a in ("fsdp", "tensor") if mesh.shape.get(a, 1) > 1}
  if sharded:
    raise ConfigError(f"train.flat_grad_allreduce needs a data-parallel mesh (parameters "
                      f"whole on every device), but mesh {dict(mesh.shape)} shards them over "
                      f"{sorted(sharded)}: set train.flat_grad_allreduce=False")


def summed_over_devices(sums_and_grads, mesh):
  """sums_and_grads(params, frozen, batch, rng) run per device under shard_map, each on its
  rows of the batch, then summed across devices with the gradients raveled into one flat
  vector: one all-reduce instead of one per parameter array.

  Why: XLA's CPU runtime reduces a combined many-array all-reduce array by array, each
  with its own rendezvous of the devices (shakespeare CPU recipe on 2 CPU devices, 38
  arrays: 2.6 ms of a 21 ms step, 0.6 ms flat). Each device folds its index into the
  dropout key, so its rows draw masks of their own (not the masks the sharded global
  step draws: same distribution, other numbers).
  """
  check_data_parallel(mesh)

  def per_device(params, frozen, batch, rng):
    rng = jax.random.fold_in(rng, jax.lax.axis_index(BATCH_AXES))
    with nn.logical_axis_rules(()):  # per-device arrays here: no sharding constraints
      (total, weight), grads = sums_and_grads(params, frozen, batch, rng)
    flat, unravel = ravel_pytree(grads)  # one float32 vector (mixed dtypes promoted)
    total, weight, flat = jax.lax.psum((total, weight, flat), BATCH_AXES)
    return (total, weight), unravel(flat)

  # check_vma=False: gradients taken inside are each device's own (no implicit psum of
  # the replicated params' cotangents); the explicit psum above sums them.
  return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(BATCH_AXES), P()),
                       out_specs=((P(), P()), P()), check_vma=False)


def make_multi_step(train_step):
  """state, frozen, batches [steps, batch, ...], rng -> (state, metrics [steps]): that many
  train steps in one compiled call (a lax.scan), so the host dispatches once for all."""

  def multi_step(state, frozen, batches, rng):
    return jax.lax.scan(lambda s, batch: train_step(s, frozen, batch, rng), state, batches)

  return multi_step


def make_eval_step(model, loss_chunk_size: int | None = None):
  """params, batch -> (sum of weighted losses, sum of weights). Batches without weights
  weigh every token 1."""

  def eval_step(params, batch):
    return loss_sums(model, params, batch, chunk_size=loss_chunk_size)

  return eval_step

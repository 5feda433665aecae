"""Pure train and eval steps. The loop jit-compiles them with shardings and donation.

Parameters come in two halves: `state.params`, the trainable ones (all of them for full
training; LoRA adapters and a classification head for LoRA), and `frozen`, the rest
(an empty dict for full training). Only the trainable half is differentiated, so the
frozen base has neither gradients nor optimizer state.

The batch decides the objective (decoder_jax/losses.py).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec as P

from decoder_jax.errors import ConfigError
from decoder_jax.losses import loss_sums
from decoder_jax.peft import combine
from decoder_jax.sharding import BATCH_AXES


def make_train_step(model, grad_accum_steps: int, dropout: bool,
                    loss_chunk_size: int | None = None, flat_allreduce_mesh=None,
                    regularizer=None, label_smoothing: float = 0.0):
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

  `label_smoothing` (train.label_smoothing) smooths the training loss (losses.py) and so
  the "loss" metric; the eval step's loss stays plain cross-entropy.
  """

  def loss_sum_fn(trainable, frozen, micro_batch, rng):
    total, weight = loss_sums(model, combine(trainable, frozen), micro_batch, rng,
                              deterministic=not dropout, chunk_size=loss_chunk_size,
                              label_smoothing=label_smoothing)
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

"""Pure train and eval steps. The loop jit-compiles them with shardings and donation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def token_losses(model, params, batch, rng=None, deterministic=True):
  """Per-token cross-entropy in float32: [batch, length]."""
  rngs = None if deterministic else {"dropout": rng}
  logits, _ = model.apply({"params": params}, batch["inputs"], deterministic=deterministic,
                          rngs=rngs)  # [batch, length, vocab]
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         batch["targets"])


def make_train_step(model, grad_accum_steps: int, dropout: bool):
  """state, batch {inputs, targets: [batch, length]}, rng -> (state, metrics).

  With gradient accumulation the batch is split into `grad_accum_steps` micro-batches
  whose gradients are averaged under a lax.scan, so memory holds one micro-batch.
  """

  def loss_fn(params, micro_batch, rng):
    return token_losses(model, params, micro_batch, rng, deterministic=not dropout).mean()

  def train_step(state, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn)
    if grad_accum_steps == 1:
      loss, grads = grad_fn(state.params, batch, rng)
    else:
      micro = jax.tree.map(
          lambda x: x.reshape((grad_accum_steps, -1) + x.shape[1:]), batch)  # [accum, micro, length]

      def accumulate(carry, inputs):
        index, micro_batch = inputs
        loss, grads = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
      (loss, grads), _ = jax.lax.scan(accumulate, zeros,
                                      (jnp.arange(grad_accum_steps), micro))
      loss, grads = jax.tree.map(lambda x: x / grad_accum_steps, (loss, grads))
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return state.apply_gradients(grads), metrics

  return train_step


def make_eval_step(model):
  """params, batch {inputs, targets, weights} -> (sum of weighted losses, sum of weights)."""

  def eval_step(params, batch):
    losses = token_losses(model, params, batch)
    return (losses * batch["weights"]).sum(), batch["weights"].sum()

  return eval_step

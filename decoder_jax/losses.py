"""The objectives training minimises and evaluation reports, over the model's outputs.

The batch decides the objective: a batch with `last_index` is scored by the
classification head (cross-entropy over labels, one example per row); a batch with
`answer_index` (label words) has one weighted target per row, so only that position's
logits are computed; any other is language modelling (per-token cross-entropy, weighted
by `weights` when the batch has them: 0 on prompts and padding). A batch with `source`
(and `source_lengths`) goes to an encoder-decoder: the encoder reads the source, the
decoder the inputs.

`label_smoothing` (eps, training only) replaces each cross-entropy by
(1 - eps) * nll + eps * the mean over the vocabulary of -log p.

`mean_loss` averages `loss_sums` over a stream of evaluation batches.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax

from decoder_jax.errors import ConfigError


def cross_entropy(logits, targets, label_smoothing: float = 0.0):
  """float32 logits [..., vocab], int targets [...] -> [...]: -log p(target), or with
  `label_smoothing` eps, (1 - eps) * that + eps * mean over the vocabulary of -log p."""
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [...]
  nll = log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [...]
  uniform = log_z - logits.mean(axis=-1)  # mean_v -log p_v, [...]
  return (1.0 - label_smoothing) * nll + label_smoothing * uniform


def apply_model(model, params, batch, deterministic=True, rngs=None, **kw):
  """model.apply on the batch's inputs (and, for an encoder-decoder, its source)."""
  if "source" in batch:
    return model.apply({"params": params}, batch["source"], batch["inputs"],
                       source_lengths=batch["source_lengths"], deterministic=deterministic,
                       rngs=rngs, **kw)
  return model.apply({"params": params}, batch["inputs"], deterministic=deterministic,
                     rngs=rngs, **kw)


def token_losses(model, params, batch, rng=None, deterministic=True, chunk_size=None,
                 label_smoothing: float = 0.0):
  """Per-token cross-entropy in float32: [batch, length].

  With `chunk_size`, the output projection and the cross-entropy run over chunks of
  `chunk_size` tokens under jax.checkpoint, so neither pass holds more than
  [chunk_size, vocab] logits (the backward pass recomputes each chunk's).
  """
  rngs = None if deterministic else {"dropout": rng}
  if not chunk_size:
    logits, _ = apply_model(model, params, batch, deterministic, rngs)  # [batch, length, vocab]
    return cross_entropy(logits.astype(jnp.float32), batch["targets"], label_smoothing)
  hidden, _ = apply_model(model, params, batch, deterministic, rngs,
                          return_hidden=True)  # [batch, length, embed]
  return chunked_token_losses(hidden, output_matrix(model.config, params), batch["targets"],
                              chunk_size, jnp.dtype(model.config.dtype), label_smoothing)


def output_matrix(config, params):
  """The LM head as [embed, vocab]: the tied embedding table's transpose or lm_head."""
  lora = config.lora
  if not config.tie_embeddings and lora is not None and lora.is_target(("lm_head",)):
    raise ConfigError("train.loss_chunk_size does not support LoRA on lm_head; merge or "
                      "untarget it")
  if config.tie_embeddings:
    return params["embed"]["embedding"].T
  return params["lm_head"]["kernel"]


def chunked_token_losses(hidden, matrix, targets, chunk_size: int, dtype,
                         label_smoothing: float = 0.0):
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
    return cross_entropy(logits, t, label_smoothing)

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


def loss_sums(model, params, batch, rng=None, deterministic=True, chunk_size=None,
              label_smoothing: float = 0.0):
  """(sum of weighted losses, sum of weights) of a batch, whatever its objective;
  `label_smoothing` (training) smooths every objective's cross-entropy."""
  if "last_index" in batch:
    losses = cross_entropy(class_logits(model, params, batch, rng, deterministic),
                           batch["labels"], label_smoothing)  # [batch]
  elif "answer_index" in batch:
    # Label words: the answer position is the only weighted target of a row (the
    # response is one token), so the [batch, length, vocab] logits would be wasted.
    losses = cross_entropy(answer_logits(model, params, batch, rng, deterministic),
                           at_answer(batch, "targets"), label_smoothing)  # [batch]
    weights = at_answer(batch, "weights")  # [batch]
    return (losses * weights).sum(), weights.sum()
  else:
    losses = token_losses(model, params, batch, rng, deterministic, chunk_size,
                          label_smoothing)  # [batch, length]
  weights = batch.get("weights")
  if weights is None:
    weights = jnp.ones_like(losses)
  return (losses * weights).sum(), weights.sum()



class InFlightSteps:
  """Keeps at most `limit` dispatched train steps unfinished.

  JAX dispatches asynchronously, so without a bound the host can queue dozens of steps
  ahead of the device. With several CPU devices in one process (`mesh.num_cpu_devices`),
  XLA's CPU runtime (jaxlib 0.10.2, 2 cores) then deadlocks in the gradient all-reduce:
  32 or more queued steps hang until XLA aborts the process, 16 or fewer do not. Two in
  flight already keep the device busy while the host prepares the next batch (a
  shakespeare CPU step took the same time with 1, 2 or 4 in flight, 37-38 ms).
  """

  def __init__(self, limit: int = 2):
    if limit < 1:
      raise ValueError(f"limit must be at least 1, got {limit}")
    self.limit = limit
    self._queue = collections.deque()  # a scalar output of each unfinished step

  def add(self, step_output) -> None:
    """Registers a just-dispatched step by one of its outputs; waits for the oldest ones
    while more than `limit` are queued."""
    self._queue.append(step_output)
    while len(self._queue) > self.limit:
      jax.block_until_ready(self._queue.popleft())


def mean_loss(loss_sums, batches) -> float:
  """Mean weighted loss over `batches`, loss_sums(batch) -> (loss sum, weight sum) on the
  device: each batch dispatched while the previous ones run (at most two in flight, see
  InFlightSteps), one fetch at the end."""
  in_flight = InFlightSteps()
  sums = []  # (loss sum, weight sum) of each batch, on the device
  for batch in batches:
    sums.append(loss_sums(batch))
    in_flight.add(sums[-1][0])
  if not sums:
    return 0.0
  total, weight = np.asarray(jax.device_get(sums), np.float64).sum(axis=0)  # [2]
  return float(total / max(weight, 1.0))

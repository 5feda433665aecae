"""train_and_evaluate(config, workdir): the training loop every entry point calls."""

from __future__ import annotations

import json
import os
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from decoder_jax.data import pipeline, tokenizers
from decoder_jax.model import Decoder, ModelConfig
from decoder_jax.train import (checkpoint, init_from, optimizer, sharding, state as state_lib,
                               steps)
from decoder_jax.train.metrics import MetricWriter, Progress

MODEL_CONFIG_FILE = "model_config.json"


def resolve_model_config(model_section, tokenizer) -> ModelConfig:
  """The model config with vocab_size filled from the tokenizer when left as None."""
  values = model_section.to_dict()
  if values.get("vocab_size") is None:
    values["vocab_size"] = tokenizer.vocab_size
  elif values["vocab_size"] < tokenizer.vocab_size:
    raise ValueError(f"model.vocab_size={values['vocab_size']} is smaller than the tokenizer's "
                     f"vocabulary ({tokenizer.vocab_size}); leave it None to use the tokenizer's")
  return ModelConfig.from_dict(values)


def read_model_config(workdir: str) -> ModelConfig:
  with open(os.path.join(workdir, MODEL_CONFIG_FILE)) as f:
    return ModelConfig.from_dict(json.load(f))


def check_batch_layout(train_config, mesh) -> None:
  dp = sharding.data_parallel_size(mesh)
  batch, accum = train_config.batch_size, train_config.grad_accum_steps
  if accum < 1 or batch % accum:
    raise ValueError(f"train.batch_size ({batch}) must be divisible by train.grad_accum_steps "
                     f"({accum})")
  if (batch // accum) % dp:
    raise ValueError(
        f"the micro-batch (train.batch_size / grad_accum_steps = {batch // accum}) must be "
        f"divisible by the data-parallel size data*fsdp = {dp} of mesh {dict(mesh.shape)}")


class _StopRequest:
  """Turns SIGTERM / Ctrl-C into a flag the loop checks after each step."""

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C aborts without waiting for the checkpoint
    self.signal_name = signal.Signals(signum).name
    logging.warning("%s received: saving a checkpoint after this step, then exiting",
                    self.signal_name)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def split_host_cpu(num_devices) -> None:
  """Presents the host CPU as `num_devices` JAX devices (a no-op for None).

  XLA runs one CPU device's program on about one core, so on a CPU-only machine a
  data-parallel mesh over several CPU devices is what puts every core to work.
  """
  if not num_devices:
    return
  try:
    jax.config.update("jax_num_cpu_devices", int(num_devices))
  except RuntimeError:  # the backend is already up (a notebook, a test): keep its devices
    logging.warning("mesh.num_cpu_devices=%s ignored: JAX already initialised %d devices",
                    num_devices, jax.device_count())


def _global_batch(local_batch: dict, batch_sharding) -> dict:
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
          for k, v in local_batch.items()}


def evaluate(eval_step, params, datasets, batch_sharding) -> float:
  total, weight = 0.0, 0.0
  for batch in datasets.eval_batches():
    loss_sum, weight_sum = eval_step(params, _global_batch(batch, batch_sharding))
    total += float(loss_sum)
    weight += float(weight_sum)
  return total / max(weight, 1.0)


def train_and_evaluate(config, workdir: str, devices=None) -> dict[str, float]:
  """Trains per `config`, resuming from `workdir` if it holds a checkpoint.

  `devices` (default: all) are laid out as `config.mesh`. Returns the last logged
  metrics (including the final "eval/loss").
  """
  train_cfg = config.train
  split_host_cpu(config.mesh.get("num_cpu_devices"))
  mesh = sharding.make_mesh(config.mesh, devices)
  check_batch_layout(train_cfg, mesh)
  if config.data.eval_batch_size % sharding.data_parallel_size(mesh):
    raise ValueError(f"data.eval_batch_size ({config.data.eval_batch_size}) must be divisible "
                     f"by the data-parallel size {sharding.data_parallel_size(mesh)}")
  is_writer = jax.process_index() == 0

  manager = checkpoint.make_manager(workdir, train_cfg.checkpoint_every, train_cfg.keep_checkpoints,
                                    train_cfg.async_checkpoints)
  resuming = manager.latest_step() is not None
  start = None  # pretrained weights to start from (config.init_from, first run only)
  tokenizer = None
  if config.get("init_from") and resuming:
    # The architecture and tokenizer the first run took from the source were saved here.
    model_config = init_from.training_config(read_model_config(workdir), config.model)
    tokenizer = tokenizers.load_tokenizer(workdir)
  elif config.get("init_from"):
    start = init_from.load(config.init_from, config.model, mesh)
    model_config, tokenizer = start.config, start.tokenizer
    logging.info("initialised from %s", config.init_from)
  max_length = model_config.max_length if tokenizer is not None else config.model.max_length
  seq_len = config.data.get("seq_len") or max_length
  if seq_len > max_length:
    raise ValueError(f"data.seq_len ({seq_len}) exceeds the model's max_length ({max_length})")
  datasets = pipeline.make_datasets(config.data, seq_len=seq_len,
                                    global_batch_size=train_cfg.batch_size, seed=config.seed,
                                    tokenizer=tokenizer)
  if tokenizer is None:
    model_config = resolve_model_config(config.model, datasets.tokenizer)
  model = Decoder(model_config)
  tx = optimizer.make_optimizer(train_cfg)
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  abstract, state_shardings = state_lib.abstract_state(model, tx, seq_len, mesh)
  if resuming:
    state, data_state = checkpoint.restore(manager, abstract)
    datasets.train_iter.set_state(data_state)
    logging.info("resumed from %s at step %d", manager.directory, int(state.step))
  elif start is not None:
    state = state_lib.state_from_params(start.params, tx, state_shardings)
    del start
  else:
    state, _ = state_lib.create_train_state(model, tx, seq_len, mesh, init_rng)
  if is_writer:  # after the restore, so a refused checkpoint leaves the workdir as it was
    with open(os.path.join(workdir, MODEL_CONFIG_FILE), "w") as f:
      json.dump(model_config.to_dict(), f, indent=2)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    tokenizers.save_tokenizer(datasets.tokenizer, workdir)
  logging.info("model: %s, %.3fM parameters; mesh %s", model_config.family,
               state_lib.count_params(state.params) / 1e6, dict(mesh.shape))

  batch_sharding = sharding.batch_sharding(mesh)
  train_step = jax.jit(
      steps.make_train_step(model, train_cfg.grad_accum_steps, dropout=model_config.dropout > 0),
      in_shardings=(state_shardings, batch_sharding, None),
      out_shardings=(state_shardings, None), donate_argnums=0)
  eval_step = jax.jit(steps.make_eval_step(model),
                      in_shardings=(state_shardings.params, batch_sharding))

  step = int(state.step)
  writer = MetricWriter(workdir, enabled=is_writer, resume_step=step)
  num_steps = train_cfg.num_steps
  stop_at = train_cfg.get("stop_at_step") or num_steps
  progress = Progress(num_steps, train_cfg.batch_size * seq_len, step)
  pending = []  # device metrics since the last log, fetched together to avoid syncs
  last = {}
  start = time.perf_counter()
  try:
    with (_StopRequest() as stop, jax.set_mesh(mesh),
          nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES)):
      while step < min(num_steps, stop_at) and stop.signal_name is None:
        batch = _global_batch(next(datasets.train_iter), batch_sharding)
        state, metrics = train_step(state, batch, dropout_rng)
        step += 1
        pending.append(metrics)
        is_last = step == num_steps
        if step % train_cfg.log_every == 0 or is_last:
          fetched = jax.device_get(pending)
          pending = []
          last = {"train/loss": float(np.mean([m["loss"] for m in fetched])),
                  "train/grad_norm": float(fetched[-1]["grad_norm"]),
                  "train/learning_rate": float(optimizer.learning_rate_schedule(train_cfg)(step - 1)),
                  **progress.rates(step)}
          writer.write(step, last)
          progress.log(step, last)
        if step % train_cfg.eval_every == 0 or is_last:
          eval_loss = evaluate(eval_step, state.params, datasets, batch_sharding)
          writer.write(step, {"eval/loss": eval_loss})
          logging.info("step %d  eval/loss=%.4f", step, eval_loss)
          last["eval/loss"] = eval_loss
        force = is_last or step == stop_at or stop.signal_name is not None
        if force or manager.should_save(step):
          checkpoint.save(manager, step, state, datasets.train_iter.get_state(), force=force)
  finally:  # an exception still lets an in-flight checkpoint finish writing
    manager.wait_until_finished()
    manager.close()
    writer.close()
  if stop.signal_name is not None:
    logging.warning("stopped by %s at step %d; checkpoint saved in %s", stop.signal_name, step,
                    workdir)
  logging.info("trained to step %d in %.1f s", step, time.perf_counter() - start)
  return last

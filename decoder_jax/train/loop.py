"""train_and_evaluate(config, workdir): the training loop every entry point calls."""

from __future__ import annotations

import itertools
import json
import math
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from decoder_jax import losses, peft, sharding, workdir as workdir_lib
from decoder_jax.errors import ConfigError, RunFailed
from decoder_jax.evaluation import task_eval
from decoder_jax.peft import combine
from decoder_jax.train import (checkpoint, compile_ahead, optimizer, setup, state as state_lib,
                               steps, stopping)
from decoder_jax.train.metrics import MetricWriter, Progress


def check_batch_layout(train_config, mesh) -> None:
  dp = sharding.data_parallel_size(mesh)
  batch, accum = train_config.batch_size, train_config.grad_accum_steps
  if accum < 1 or batch % accum:
    raise ConfigError(f"train.batch_size ({batch}) must be divisible by train.grad_accum_steps "
                      f"({accum})")
  if (batch // accum) % dp:
    raise ConfigError(
        f"the micro-batch (train.batch_size / grad_accum_steps = {batch // accum}) must be "
        f"divisible by the data-parallel size data*fsdp = {dp} of mesh {dict(mesh.shape)}")
  if train_config.get("flat_grad_allreduce"):
    steps.check_data_parallel(mesh)
  per_call = train_config.get("steps_per_call") or 1
  if per_call < 1:
    raise ConfigError(f"train.steps_per_call must be at least 1, got {per_call}")
  for name in ("log_every", "eval_every", "checkpoint_every"):
    if train_config[name] % per_call:
      raise ConfigError(f"train.steps_per_call ({per_call}) must divide train.{name} "
                        f"({train_config[name]}): the host acts only between calls")


def call_sizes(first_step: int, end_step: int, per_call: int):
  """How many steps each compiled call runs, from `first_step` to `end_step`: `per_call`
  from each multiple of it, single steps where fewer remain or before the first one."""
  step = first_step
  while step < end_step:
    size = per_call if step % per_call == 0 and step + per_call <= end_step else 1
    yield size
    step += size


class DevicePrefetch:
  """The training batches, handed to the device (`to_device`) one call ahead of the call
  that reads them, so their host-to-device copy overlaps the steps in flight.

  Each item is (n, batches): the n batches of one compiled call (`sizes` gives each call's
  n, default 1), as `to_device(list of n host batches)` places them. get_state() is the
  data state of the first batch not yet returned (the iterator itself has read one call
  further), which is what a checkpoint after the last dispatched call must resume from.
  """

  def __init__(self, iterator, to_device, sizes=None):
    self._iterator, self._to_device = iterator, to_device
    self._sizes = iter(sizes) if sizes is not None else itertools.repeat(1)
    self._ahead = None  # (data state before the call's batches, n, batches on the device)

  def _read(self):
    size = next(self._sizes)  # StopIteration here: no calls left
    state = self._iterator.get_state()
    host = []
    try:
      while len(host) < size:
        host.append(next(self._iterator))
    except StopIteration:
      pass
    if not host:
      raise StopIteration  # a finite source ended at a call's boundary
    # A finite source that ends inside a call gives a shorter last call, not a dropped one.
    return state, len(host), self._to_device(host)

  def __iter__(self):
    return self

  def __next__(self):
    if self._ahead is None:
      self._ahead = self._read()  # StopIteration here: nothing left
    _, size, batches = self._ahead
    try:
      self._ahead = self._read()
    except StopIteration:  # no calls left, or a finite source ended
      self._ahead = None
    return size, batches

  def get_state(self):
    return self._ahead[0] if self._ahead is not None else self._iterator.get_state()


def _global_batch(local_batch: dict, batch_sharding) -> dict:
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
          for k, v in local_batch.items()}


def _peek_abstract_batch(iterator, batch_sharding):
  """Shapes, dtypes and shardings of the iterator's next (global) batch; the iterator is
  set back to where it was."""
  position = iterator.get_state()
  batch = next(iterator)
  iterator.set_state(position)
  return sharding.abstract_like(_global_batch(batch, batch_sharding))


def _stacked_abstract(one_batch, size, stacked_sharding):
  """The input of a `size`-step call: `one_batch` itself, or `size` of it stacked."""
  if size == 1:
    return one_batch
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((size, *x.shape), x.dtype,
                                                     sharding=stacked_sharding), one_batch)


def evaluate(eval_step, params, frozen, datasets, batch_sharding) -> float:
  """Mean weighted loss over the (main) eval batches."""
  return losses.mean_loss(lambda batch: eval_step(params, frozen, _global_batch(batch, batch_sharding)),
                   datasets.eval_batches())


class _Profiler:
  """train.profile_steps=N: a jax.profiler trace of N steps, starting 2 steps after this
  run's first (compilation and warm-up stay out of it), written to WORKDIR/profile for
  TensorBoard's profile plugin or Perfetto (ui.perfetto.dev opens the .trace.json.gz).
  With train.steps_per_call > 1 the trace starts and stops at the calls' ends."""

  def __init__(self, workdir, first_step, num_steps, enabled):
    self.directory = os.path.join(os.path.abspath(workdir), "profile")
    self.start_after = first_step + 2  # trace the steps after this one
    self.stop_after = self.start_after + (num_steps or 0)
    self.enabled = bool(num_steps) and enabled
    self.active = False
    self.started_at = None

  def after_step(self, step, metrics):
    if not self.enabled:
      return
    if self.started_at is None and step >= self.start_after:
      jax.block_until_ready(metrics)  # the trace starts with the device idle
      jax.profiler.start_trace(self.directory)
      self.active, self.started_at = True, step
    elif self.active and step >= self.stop_after:
      jax.block_until_ready(metrics)  # the traced steps' device work is in the trace
      self.stop()
      logging.info("profile of steps %d-%d written to %s (tensorboard --logdir %s, or "
                   "ui.perfetto.dev)", self.started_at + 1, step, self.directory,
                   self.directory)

  def stop(self):
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


class TaskEvaluator:
  """Task metrics at each evaluation (eval/bleu, eval/accuracy, ...) and the best
  checkpoint by config.eval.metric: the trainable params in workdir/best (orbax), with
  best.json saying which step and value."""

  def __init__(self, config, workdir, run, is_writer):
    self.eval_config = config.get("eval") or task_eval.default_eval_config()
    # Plain pretraining configs have no eval section: no best-checkpoint copy there.
    self.keep_best = config.get("eval") is not None and self.eval_config.keep_best
    self.metric = self.eval_config.metric
    if self.metric not in task_eval.HIGHER_IS_BETTER:
      raise ConfigError(f"eval.metric must be one of {sorted(task_eval.HIGHER_IS_BETTER)}, "
                        f"got {self.metric!r}")
    self.run, self.workdir, self.is_writer = run, workdir, is_writer
    self.best_dir = os.path.join(os.path.abspath(workdir), workdir_lib.BEST_DIR)
    self.best = self._read_best()

  def _read_best(self):
    try:
      with open(os.path.join(self.workdir, workdir_lib.BEST_FILE)) as f:
        return json.load(f)
    except FileNotFoundError:
      return None

  def __call__(self, step, params, frozen, eval_loss_fn) -> dict[str, float]:
    """eval/* metrics at `step`; `eval_loss_fn()` gives the eval loss when the task
    evaluation does not measure it on the way."""
    found = {}
    if self.run.task is not None:
      found.update(task_eval.evaluate_task(self.run.model, combine(params, frozen),
                                                 self.run.tokenizer, self.run.datasets,
                                                 self.eval_config))
    if "loss" not in found:
      found["loss"] = eval_loss_fn()
    if self.run.task is not None and self.run.task.kind == "chat":
      found["perplexity"] = math.exp(min(found["loss"], 50.0))  # per assistant token
    if self.metric not in found:
      raise ConfigError(f"eval.metric={self.metric!r} is not measured for this run; it "
                        f"measures {sorted(found)}")
    if self.keep_best:
      self._keep_if_best(step, params, found[self.metric])
    return {f"eval/{k}": v for k, v in found.items()}

  def _keep_if_best(self, step, params, value):
    higher = task_eval.HIGHER_IS_BETTER[self.metric]
    if self.best is not None and not (value > self.best["value"] if higher
                                      else value < self.best["value"]):
      return
    checkpoint.save_params_replacing(self.best_dir, params, self.is_writer)
    self.best = {"step": step, "metric": self.metric, "value": value}
    if self.is_writer:  # replaced whole, like the params
      best_json = os.path.join(self.workdir, workdir_lib.BEST_FILE)
      with open(best_json + ".new", "w") as f:
        json.dump(self.best, f)
      os.replace(best_json + ".new", best_json)
    logging.info("best %s so far (%.4f at step %d): params saved to %s", self.metric, value,
                 step, self.best_dir)


def train_and_evaluate(config, workdir: str, devices=None) -> dict[str, float]:
  """Trains per `config`, resuming from `workdir` if it holds a checkpoint.

  `devices` (default: all) are laid out as `config.mesh`. Returns the last logged
  metrics (including the final "eval/loss").
  """
  train_cfg = config.train
  checkpoint.check_workdir(workdir)
  sharding.split_host_cpu(config.mesh.get("num_cpu_devices"))
  mesh = sharding.make_mesh(config.mesh, devices)
  check_batch_layout(train_cfg, mesh)
  if config.data.eval_batch_size % sharding.data_parallel_size(mesh):
    raise ConfigError(f"data.eval_batch_size ({config.data.eval_batch_size}) must be divisible "
                      f"by the data-parallel size {sharding.data_parallel_size(mesh)}")
  is_writer = jax.process_index() == 0
  nonfinite = stopping.check_choice(train_cfg)
  if jax.process_count() > 1 and config.get("task") is not None:
    raise ConfigError("task fine-tuning (config.task) runs in one process for now: its "
                      "evaluation decodes on one host; start it without launch/local.sh")

  resuming = workdir_lib.latest_step(workdir) is not None
  peft_run = setup.uses_peft(config)  # checkpoints hold the trainable half only
  # The model, data and task are checked before anything is written: a bad config or
  # corpus leaves a new workdir uncreated.
  run = setup.build_run(config, workdir, mesh, need_base=peft_run, resuming=resuming)
  task_evaluator = TaskEvaluator(config, workdir, run, is_writer)
  manager = checkpoint.make_manager(workdir, train_cfg.checkpoint_every, train_cfg.keep_checkpoints,
                                    train_cfg.async_checkpoints)
  model_config, model, datasets = run.model_config, run.model, run.datasets
  tx = setup.make_optimizer(train_cfg, model_config)
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  abstract, state_shardings, abstract_frozen, frozen_shardings = setup.abstract_state(
      run, tx, mesh, train_cfg.get("frozen_dtype"))
  first_step = manager.latest_step() if resuming else 0  # the step restore() reads

  batch_sharding = sharding.batch_sharding(mesh)
  method = model_config.lora or model_config.adalora
  dropout = model_config.dropout > 0 or (method is not None and method.dropout > 0)
  step_fn = steps.make_train_step(
      model, train_cfg.grad_accum_steps, dropout=dropout,
      loss_chunk_size=train_cfg.get("loss_chunk_size"),
      flat_allreduce_mesh=mesh if train_cfg.get("flat_grad_allreduce") else None,
      regularizer=peft.adalora.regularizer(model_config))

  def jit_step(fn, batches_sharding):  # (state, frozen, batch(es), rng) -> (state, metrics)
    return jax.jit(fn, in_shardings=(state_shardings, frozen_shardings, batches_sharding, None),
                   out_shardings=(state_shardings, None), donate_argnums=0)

  train_step = jit_step(step_fn, batch_sharding)
  # train.steps_per_call > 1: that many steps per call, their batches stacked [steps, ...].
  per_call = train_cfg.get("steps_per_call") or 1
  stacked_sharding = NamedSharding(mesh, P(None, *batch_sharding.spec))
  multi_step = jit_step(steps.make_multi_step(step_fn), stacked_sharding)

  def to_device(host_batches):
    if len(host_batches) == 1:
      return _global_batch(host_batches[0], batch_sharding)
    return _global_batch({k: np.stack([np.asarray(b[k]) for b in host_batches])
                          for k in host_batches[0]}, stacked_sharding)
  eval_loss_sums = steps.make_eval_step(model, train_cfg.get("loss_chunk_size"))
  eval_step = jax.jit(lambda params, frozen, batch: eval_loss_sums(combine(params, frozen), batch),
                      in_shardings=(state_shardings.params, frozen_shardings, batch_sharding))

  num_steps = train_cfg.num_steps
  stop_at = train_cfg.get("stop_at_step") or num_steps
  end_step = min(num_steps, stop_at)
  call_list = list(call_sizes(first_step, end_step, per_call))
  # The train and eval steps compile on worker threads while the parameters are restored
  # or initialised.
  ahead = compile_ahead.AheadOfTime(lambda: (jax.set_mesh(mesh), nn.logical_axis_rules(
      sharding.LOGICAL_AXIS_RULES)))
  try:
    step_programs = {}
    one_batch = _peek_abstract_batch(datasets.train_iter, batch_sharding)

    def compile_calls(sizes, first_size):  # the programs of calls of `sizes` steps
      for size in sorted(set(sizes) - set(step_programs)):
        step_programs[size] = ahead.program(
            train_step if size == 1 else multi_step, abstract, abstract_frozen,
            _stacked_abstract(one_batch, size, stacked_sharding), dropout_rng,
            varying_argnums=(2,),  # the batch
            background=size != first_size)  # e.g. single steps for a tail

    if call_list:
      compile_calls(call_list, call_list[0])
    first_eval = next(iter(datasets.eval_batches()), None)
    if first_eval is not None:
      eval_step = ahead.program(eval_step, abstract.params, abstract_frozen,
                                sharding.abstract_like(_global_batch(first_eval, batch_sharding)),
                                background=True)

    if resuming:  # the newest step that reads back, which may be older than first_step
      state, data_state = checkpoint.restore_readable(manager, abstract, workdir)
      datasets.train_iter.set_state(data_state)
      logging.info("resumed from %s at step %d", manager.directory, int(state.step))
      if int(state.step) != first_step:
        first_step = int(state.step)
        call_list = list(call_sizes(first_step, end_step, per_call))
        compile_calls(call_list, None)
    if not resuming or peft_run:  # their checkpoints hold the trainable half only
      trainable, frozen = setup.split_params(run, setup.initial_params(run, mesh, init_rng),
                                             frozen_shardings, train_cfg.get("frozen_dtype"))
      if not resuming:
        state = state_lib.state_from_params(trainable, tx, state_shardings)
      del trainable
    else:
      frozen = {}
  except BaseException:
    ahead.close()  # compiles not yet started are dropped
    raise
  batches = DevicePrefetch(datasets.train_iter, to_device, call_list)
  run.start = None  # the source's copy of the weights is no longer needed
  if is_writer:  # after the restore, so a refused checkpoint leaves the workdir as it was
    workdir_lib.write_run_files(workdir, model_config, config, run.tokenizer)
  num_trainable = state_lib.count_params(state.params)
  num_total = num_trainable + state_lib.count_params(frozen)
  logging.info("model: %s, %.3fM parameters, %.3fM trainable (%.2f%%); mesh %s",
               model_config.family, num_total / 1e6, num_trainable / 1e6,
               100 * num_trainable / num_total, dict(mesh.shape))
  if jax.process_count() > 1:  # the data pipeline logs which rows of a batch it reads
    logging.info("process %d of %d: %d of the mesh's %d devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())

  step = int(state.step)
  writer = MetricWriter(workdir, enabled=is_writer, resume_step=step)
  progress = Progress(num_steps, train_cfg.batch_size * run.seq_len, step)
  pending = []  # device metrics since the last log, fetched together
  # A log step's metrics are fetched after the next step is dispatched, so the host never
  # waits for the device with nothing queued (no bubble at log steps).
  unlogged = None  # (step, [metrics]) awaiting its fetch
  last = {}
  start = time.perf_counter()
  profiler = _Profiler(workdir, step, train_cfg.get("profile_steps"), is_writer)
  in_flight = losses.InFlightSteps()
  # One compiled program: evaluated op by op, the schedule would compile each of its ~10
  # operations separately on first use (about 0.6 s of start-up on a 2-core CPU).
  learning_rate_at = jax.jit(optimizer.learning_rate_schedule(train_cfg))
  # Each entry a step's scalar or a call's [steps] array: the mean over steps, the last norm.
  # Steps skipped for a non-finite loss (train.on_nonfinite=skip) stay out of the mean.
  def summarize(losses, grad_norms):
    losses = jnp.concatenate([jnp.ravel(x) for x in losses])  # [steps since the last log]
    finite = jnp.isfinite(losses)
    mean = jnp.sum(jnp.where(finite, losses, 0.0)) / jnp.sum(finite)  # nan if none is
    return mean, jnp.ravel(grad_norms)[-1]
  summarize_metrics = jax.jit(summarize)

  def write_train_metrics(logged_step, device_metrics):
    guard.check(state.opt_state, last_saved)  # the host reads the device here anyway
    # One device op and one transfer for the whole log interval: fetching each step's
    # scalars separately cost about 1 ms apiece on a 2-core CPU (2 ms per step).
    mean_loss, grad_norm = jax.device_get(
        summarize_metrics([m["loss"] for m in device_metrics], device_metrics[-1]["grad_norm"]))
    last.update({"train/loss": float(mean_loss),
                 "train/grad_norm": float(grad_norm),
                 "train/learning_rate": float(learning_rate_at(logged_step - 1)),
                 **progress.rates(logged_step)})
    skipped = stopping.skipped_steps(state.opt_state)
    if skipped is not None:
      last["train/skipped_steps"] = int(skipped)
    writer.write(logged_step, {k: v for k, v in last.items() if k.startswith("train/")})
    progress.log(logged_step, {k: v for k, v in last.items() if k.startswith("train/")})

  guard = stopping.NonFiniteGuard(nonfinite, train_cfg.get("max_nonfinite_skips") or 10,
                                  manager.directory)
  last_saved = first_step if resuming else None

  def save(step, force):  # the state checked finite first: a bad one is never written
    guard.check(state.opt_state, last_saved)
    return checkpoint.save(manager, step, state, batches.get_state(), force=force)

  try:
    with (stopping.StopRequest() as stop, jax.set_mesh(mesh),
          nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES)):
      while step < end_step and not stop.requested:
        size, batch = next(batches, (0, None))
        if size not in step_programs:  # the train iterator is endless unless replaced
          raise RunFailed(f"the training data ended at step {step + size}, before "
                          f"train.num_steps={num_steps}; the steps up to the last "
                          f"checkpoint are in {manager.directory}")
        state, metrics = step_programs[size](state, frozen, batch, dropout_rng)
        in_flight.add(metrics["loss"])
        guard.add(step, metrics)
        step += size
        profiler.after_step(step, metrics)
        stopping_now = stop.after_call()  # the same on every process
        if unlogged is not None:
          write_train_metrics(*unlogged)
          unlogged = None
        pending.append(metrics)
        is_last = step == num_steps
        if step % train_cfg.log_every == 0 or is_last:
          unlogged, pending = (step, pending), []
        is_eval = step % train_cfg.eval_every == 0 or is_last
        force = is_last or step == stop_at or stopping_now
        if unlogged is not None and (is_eval or force or manager.should_save(step)):
          write_train_metrics(*unlogged)  # the host waits here anyway
          unlogged = None
        if is_eval:
          guard.check(state.opt_state, last_saved)
          evaluated = task_evaluator(step, state.params, frozen, lambda: evaluate(
              eval_step, state.params, frozen, datasets, batch_sharding))
          writer.write(step, evaluated)
          logging.info("step %d  %s", step,
                       "  ".join(f"{k}={v:.4f}" for k, v in evaluated.items()))
          last.update(evaluated)
        if (force or manager.should_save(step)) and save(step, force):
          last_saved = step
    manager.wait_until_finished()  # an asynchronous write's failure surfaces here
  except Exception as e:  # pylint: disable=broad-except  # a full disk, from either place
    failure = checkpoint.write_failure(e, manager)
    if failure is None:
      raise
    raise failure from e
  finally:  # an exception still lets an in-flight checkpoint finish writing
    ahead.close()
    profiler.stop()
    try:
      manager.wait_until_finished()
      manager.close()
    except Exception as e:  # pylint: disable=broad-except
      if checkpoint.write_failure(e, manager) is None:
        raise
    writer.close()
  if stop.requested:
    logging.warning("stopped by %s at step %d; checkpoint saved in %s",
                    stop.signal_name or "another process's signal", step, workdir)
  logging.info("trained to step %d in %.1f s", step, time.perf_counter() - start)
  return last

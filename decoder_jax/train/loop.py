"""train_and_evaluate(config, workdir): the training loop every entry point calls."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

from decoder_jax import losses, peft, sharding, workdir as workdir_lib
from decoder_jax.errors import ConfigError, RunFailed
from decoder_jax.evaluation import task_eval
from decoder_jax.peft import combine
from decoder_jax.train import (checkpoint, compile_ahead, feeding, optimizer, setup,
                               state as state_lib, steps, stopping)
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

  The steps, in the order the data flows: build the run (nothing is written yet),
  compile its programs (on worker threads), restore or initialise the state meanwhile,
  loop over the steps, finish (wait for the last checkpoint, report).
  """
  built = _build(config, workdir, devices)
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  programs = _Programs(built, dropout_rng)
  try:
    programs.compile_calls(built.call_list())
    state, frozen = _restore_or_init(built, programs, init_rng)
  except BaseException:
    programs.close()  # compiles not yet started are dropped
    raise
  _write_run_files(built, state, frozen)
  return _run_and_finish(built, _Loop(built, programs, state, frozen, dropout_rng))


@dataclasses.dataclass
class _Built:
  """Step 1: what the run is made of, checked, before anything compiles or is written."""
  config: Any
  workdir: str
  mesh: Any
  run: setup.Run
  manager: Any  # orbax CheckpointManager of WORKDIR/checkpoints
  tx: Any
  abstract: Any  # the TrainState's ShapeDtypeStructs (shardings included)
  state_shardings: Any
  abstract_frozen: Any
  frozen_shardings: Any
  placement: feeding.BatchPlacement
  task_evaluator: TaskEvaluator
  nonfinite: str  # train.on_nonfinite
  resuming: bool
  first_step: int  # the step restore() reads (it may fall back to an older one)
  end_step: int  # where this invocation stops: train.num_steps or train.stop_at_step

  @property
  def train_cfg(self):
    return self.config.train

  @property
  def is_writer(self) -> bool:
    return jax.process_index() == 0

  def call_list(self) -> list[int]:
    return list(feeding.call_sizes(self.first_step, self.end_step,
                                   self.train_cfg.get("steps_per_call") or 1))


def _build(config, workdir: str, devices) -> _Built:
  train_cfg = config.train
  checkpoint.check_workdir(workdir)
  sharding.split_host_cpu(config.mesh.get("num_cpu_devices"))
  mesh = sharding.make_mesh(config.mesh, devices)
  check_batch_layout(train_cfg, mesh)
  if config.data.eval_batch_size % sharding.data_parallel_size(mesh):
    raise ConfigError(f"data.eval_batch_size ({config.data.eval_batch_size}) must be divisible "
                      f"by the data-parallel size {sharding.data_parallel_size(mesh)}")
  nonfinite = stopping.check_choice(train_cfg)
  if jax.process_count() > 1 and config.get("task") is not None:
    raise ConfigError("task fine-tuning (config.task) runs in one process for now: its "
                      "evaluation decodes on one host; start it without launch/local.sh")
  resuming = workdir_lib.latest_step(workdir) is not None
  # The model, data and task are checked before anything is written: a bad config or
  # corpus leaves a new workdir uncreated.
  run = setup.build_run(config, workdir, mesh, need_base=setup.uses_peft(config),
                        resuming=resuming)
  task_evaluator = TaskEvaluator(config, workdir, run, jax.process_index() == 0)
  manager = checkpoint.make_manager(workdir, train_cfg.checkpoint_every,
                                    train_cfg.keep_checkpoints, train_cfg.async_checkpoints)
  tx = setup.make_optimizer(train_cfg, run.model_config)
  abstract, state_shardings, abstract_frozen, frozen_shardings = setup.abstract_state(
      run, tx, mesh, train_cfg.get("frozen_dtype"))
  return _Built(config, workdir, mesh, run, manager, tx, abstract, state_shardings,
                abstract_frozen, frozen_shardings, feeding.BatchPlacement(mesh), task_evaluator,
                nonfinite, resuming, first_step=manager.latest_step() if resuming else 0,
                end_step=min(train_cfg.num_steps,
                             train_cfg.get("stop_at_step") or train_cfg.num_steps))


class _Programs:
  """Step 2: the jitted train calls (one program per number of steps a call runs) and the
  eval step, compiled ahead of time on worker threads while step 3 restores or
  initialises the parameters."""

  def __init__(self, built: _Built, dropout_rng):
    self.built, self.dropout_rng = built, dropout_rng
    run, train_cfg = built.run, built.train_cfg
    config = run.model_config
    method = config.lora or config.adalora
    step_fn = steps.make_train_step(
        run.model, train_cfg.grad_accum_steps,
        dropout=config.dropout > 0 or (method is not None and method.dropout > 0),
        loss_chunk_size=train_cfg.get("loss_chunk_size"),
        flat_allreduce_mesh=built.mesh if train_cfg.get("flat_grad_allreduce") else None,
        regularizer=peft.adalora.regularizer(config),
        label_smoothing=train_cfg.get("label_smoothing") or 0.0)

    def jit_step(fn, batches_sharding):  # (state, frozen, batch(es), rng) -> (state, metrics)
      return jax.jit(fn, in_shardings=(built.state_shardings, built.frozen_shardings,
                                       batches_sharding, None),
                     out_shardings=(built.state_shardings, None), donate_argnums=0)

    self._train_step = jit_step(step_fn, built.placement.one)
    # train.steps_per_call > 1: that many steps per call, their batches stacked [steps, ...].
    self._multi_step = jit_step(steps.make_multi_step(step_fn), built.placement.stacked)
    eval_loss_sums = steps.make_eval_step(run.model, train_cfg.get("loss_chunk_size"))
    self.eval_step = jax.jit(
        lambda params, frozen, batch: eval_loss_sums(combine(params, frozen), batch),
        in_shardings=(built.state_shardings.params, built.frozen_shardings,
                      built.placement.one))
    self.ahead = compile_ahead.AheadOfTime(lambda: (jax.set_mesh(built.mesh),
                                                    nn.logical_axis_rules(
                                                        sharding.LOGICAL_AXIS_RULES)))
    self.calls = {}  # steps per call -> its compiled program
    self._one_batch = None

  def compile_calls(self, sizes: list[int], first_size: int | None = -1) -> None:
    """Compiles the programs of calls of `sizes` steps not compiled yet; the one of
    `first_size` (default: the first call's) in the foreground, the others behind it.
    The first time, the eval step too (in the background)."""
    built = self.built
    if self._one_batch is None:
      self._one_batch = feeding.peek_abstract_batch(built.run.datasets.train_iter,
                                                    built.placement.one)
      first_eval = next(iter(built.run.datasets.eval_batches()), None)
      if first_eval is not None:
        self.eval_step = self.ahead.program(
            self.eval_step, built.abstract.params, built.abstract_frozen,
            sharding.abstract_like(feeding.global_batch(first_eval, built.placement.one)),
            background=True)
    if first_size == -1:
      first_size = sizes[0] if sizes else None
    for size in sorted(set(sizes) - set(self.calls)):
      self.calls[size] = self.ahead.program(
          self._train_step if size == 1 else self._multi_step, built.abstract,
          built.abstract_frozen, built.placement.abstract_call(self._one_batch, size),
          self.dropout_rng, varying_argnums=(2,),  # the batch
          background=size != first_size)  # e.g. single steps for a tail

  def close(self) -> None:
    self.ahead.close()


def _restore_or_init(built: _Built, programs: _Programs, init_rng):
  """Step 3: (state, frozen params): the newest checkpoint that reads back, or the
  initial state; a parameter-efficient run's frozen base from config.init_from."""
  run = built.run
  if built.resuming:  # the newest step that reads back, which may be older than first_step
    state, data_state = checkpoint.restore_readable(built.manager, built.abstract,
                                                    built.workdir)
    run.datasets.train_iter.set_state(data_state)
    logging.info("resumed from %s at step %d", built.manager.directory, int(state.step))
    if int(state.step) != built.first_step:
      built.first_step = int(state.step)
      programs.compile_calls(built.call_list(), None)
  frozen = {}
  if not built.resuming or setup.uses_peft(built.config):  # checkpoints: the trainable half
    trainable, frozen = setup.split_params(run, setup.initial_params(run, built.mesh, init_rng),
                                           built.frozen_shardings,
                                           built.train_cfg.get("frozen_dtype"))
    if not built.resuming:
      state = state_lib.state_from_params(trainable, built.tx, built.state_shardings)
    del trainable
  run.start = None  # the source's copy of the weights is no longer needed
  return state, frozen


def _write_run_files(built: _Built, state, frozen) -> None:
  """The workdir's model config, run config and tokenizer (after the restore, so a refused
  checkpoint leaves the workdir as it was), and what the run trains, logged."""
  run, mesh = built.run, built.mesh
  if built.is_writer:
    workdir_lib.write_run_files(built.workdir, run.model_config, built.config, run.tokenizer)
  num_trainable = state_lib.count_params(state.params)
  num_total = num_trainable + state_lib.count_params(frozen)
  logging.info("model: %s, %.3fM parameters, %.3fM trainable (%.2f%%); mesh %s",
               run.model_config.family, num_total / 1e6, num_trainable / 1e6,
               100 * num_trainable / num_total, dict(mesh.shape))
  if jax.process_count() > 1:  # the data pipeline logs which rows of a batch it reads
    logging.info("process %d of %d: %d of the mesh's %d devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def _summarize(losses_list, grad_norms):
  """(mean loss, last gradient norm) of a log interval: each entry a step's scalar or a
  call's [steps] array. Steps skipped for a non-finite loss (train.on_nonfinite=skip)
  stay out of the mean."""
  values = jnp.concatenate([jnp.ravel(x) for x in losses_list])  # [steps since the last log]
  finite = jnp.isfinite(values)
  mean = jnp.sum(jnp.where(finite, values, 0.0)) / jnp.sum(finite)  # nan if none is
  return mean, jnp.ravel(grad_norms)[-1]


class _Loop:
  """Step 4: the steps, with the host's work between calls: logging, evaluation and
  checkpoints at their intervals, a stop on SIGTERM (on any process)."""

  def __init__(self, built: _Built, programs: _Programs, state, frozen, dropout_rng):
    train_cfg = built.train_cfg
    self.built, self.programs, self.dropout_rng = built, programs, dropout_rng
    self.state, self.frozen = state, frozen
    self.batches = feeding.DevicePrefetch(built.run.datasets.train_iter,
                                          built.placement.to_device, built.call_list())
    self.step = int(state.step)
    self.writer = MetricWriter(built.workdir, enabled=built.is_writer, resume_step=self.step)
    self.progress = Progress(train_cfg.num_steps, train_cfg.batch_size * built.run.seq_len,
                             self.step)
    self.profiler = _Profiler(built.workdir, self.step, train_cfg.get("profile_steps"),
                              built.is_writer)
    self.in_flight = losses.InFlightSteps()
    # One compiled program: evaluated op by op, the schedule would compile each of its ~10
    # operations separately on first use (about 0.6 s of start-up on a 2-core CPU).
    self.learning_rate_at = jax.jit(optimizer.learning_rate_schedule(train_cfg))
    self.summarize = jax.jit(_summarize)
    self.guard = stopping.NonFiniteGuard(built.nonfinite,
                                         train_cfg.get("max_nonfinite_skips") or 10,
                                         built.manager.directory)
    self.last_saved = built.first_step if built.resuming else None
    self.last = {}  # the latest logged metrics
    self.stop = stopping.StopRequest()

  def write_train_metrics(self, logged_step: int, device_metrics: list) -> None:
    self.guard.check(self.state.opt_state, self.last_saved)  # the host reads the device here anyway
    # One device op and one transfer for the whole log interval: fetching each step's
    # scalars separately cost about 1 ms apiece on a 2-core CPU (2 ms per step).
    mean_loss, grad_norm = jax.device_get(self.summarize(
        [m["loss"] for m in device_metrics], device_metrics[-1]["grad_norm"]))
    self.last.update({"train/loss": float(mean_loss), "train/grad_norm": float(grad_norm),
                      "train/learning_rate": float(self.learning_rate_at(logged_step - 1)),
                      **self.progress.rates(logged_step)})
    skipped = stopping.skipped_steps(self.state.opt_state)
    if skipped is not None:
      self.last["train/skipped_steps"] = int(skipped)
    train_metrics = {k: v for k, v in self.last.items() if k.startswith("train/")}
    self.writer.write(logged_step, train_metrics)
    self.progress.log(logged_step, train_metrics)

  def evaluate(self) -> None:
    built, state = self.built, self.state
    self.guard.check(state.opt_state, self.last_saved)
    eval_loss = lambda: losses.mean_loss(  # noqa: E731
        lambda batch: self.programs.eval_step(state.params, self.frozen, feeding.global_batch(
            batch, built.placement.one)), built.run.datasets.eval_batches())
    evaluated = built.task_evaluator(self.step, state.params, self.frozen, eval_loss)
    self.writer.write(self.step, evaluated)
    logging.info("step %d  %s", self.step,
                 "  ".join(f"{k}={v:.4f}" for k, v in evaluated.items()))
    self.last.update(evaluated)

  def save(self, force: bool) -> None:
    """A checkpoint of this step; the state checked finite first: a bad one is never
    written."""
    self.guard.check(self.state.opt_state, self.last_saved)
    if checkpoint.save(self.built.manager, self.step, self.state, self.batches.get_state(),
                       force=force):
      self.last_saved = self.step

  def run(self) -> dict[str, float]:
    built, train_cfg, manager = self.built, self.built.train_cfg, self.built.manager
    num_steps, stop_at = train_cfg.num_steps, train_cfg.get("stop_at_step") or train_cfg.num_steps
    pending = []  # device metrics since the last log, fetched together
    # A log step's metrics are fetched after the next step is dispatched, so the host never
    # waits for the device with nothing queued (no bubble at log steps).
    unlogged = None  # (step, [metrics]) awaiting its fetch
    with self.stop, jax.set_mesh(built.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
      while self.step < built.end_step and not self.stop.requested:
        size, batch = next(self.batches, (0, None))
        if size not in self.programs.calls:  # the train iterator is endless unless replaced
          raise RunFailed(f"the training data ended at step {self.step + size}, before "
                          f"train.num_steps={num_steps}; the steps up to the last "
                          f"checkpoint are in {manager.directory}")
        self.state, metrics = self.programs.calls[size](self.state, self.frozen, batch,
                                                        self.dropout_rng)
        self.in_flight.add(metrics["loss"])
        self.guard.add(self.step, metrics)
        self.step += size
        self.profiler.after_step(self.step, metrics)
        stopping_now = self.stop.after_call()  # the same on every process
        if unlogged is not None:
          self.write_train_metrics(*unlogged)
          unlogged = None
        pending.append(metrics)
        is_last = self.step == num_steps
        if self.step % train_cfg.log_every == 0 or is_last:
          unlogged, pending = (self.step, pending), []
        is_eval = self.step % train_cfg.eval_every == 0 or is_last
        force = is_last or self.step == stop_at or stopping_now
        if unlogged is not None and (is_eval or force or manager.should_save(self.step)):
          self.write_train_metrics(*unlogged)  # the host waits here anyway
          unlogged = None
        if is_eval:
          self.evaluate()
        if force or manager.should_save(self.step):
          self.save(force)
    return self.last


def _run_and_finish(built: _Built, loop: _Loop) -> dict[str, float]:
  """Steps 4 and 5: the loop, then the last checkpoint's write waited for. A full disk on
  the way ends the run with one line; whatever happens, an in-flight checkpoint finishes
  writing."""
  manager = built.manager
  start = time.perf_counter()
  try:
    last = loop.run()
    manager.wait_until_finished()  # an asynchronous write's failure surfaces here
  except Exception as e:  # pylint: disable=broad-except  # a full disk, from either place
    failure = checkpoint.write_failure(e, manager)
    if failure is None:
      raise
    raise failure from e
  finally:
    loop.programs.close()
    loop.profiler.stop()
    try:
      manager.wait_until_finished()
      manager.close()
    except Exception as e:  # pylint: disable=broad-except
      if checkpoint.write_failure(e, manager) is None:
        raise
    loop.writer.close()
  if loop.stop.requested:
    logging.warning("stopped by %s at step %d; checkpoint saved in %s",
                    loop.stop.signal_name or "another process's signal", loop.step,
                    built.workdir)
  logging.info("trained to step %d in %.1f s", loop.step, time.perf_counter() - start)
  return last

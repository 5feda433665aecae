"""Why a run ends before its last step: a stop signal, agreed by every process, or a loss
that is no longer finite."""

from __future__ import annotations

import signal

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from decoder_jax.errors import ConfigError, RunFailed

NONFINITE_CHOICES = ("stop", "skip")


class StopRequest:
  """SIGTERM / Ctrl-C as a flag the loop reads after each dispatched call.

  With several processes, a signal reaches one of them (a preempted host, a `kill`), yet
  all must save the same step and exit. After each call every process dispatches a tiny
  collective, the maximum of the processes' flags, and reads the previous call's result:
  the host does not wait for this call's, and all processes read the same values at the
  same calls, so they stop after the same step.
  """

  def __init__(self):
    self.signal_name = None  # the signal this process received
    self.requested = False  # agreed: every process stops after the current call
    self._previous = {}
    self._agree = None  # (flags sharding, jitted max) with several processes
    self._pending = None  # the last call's agreement, on the device

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    if jax.process_count() > 1:
      mesh = Mesh(np.asarray(jax.devices()), ("devices",))
      self._agree = (NamedSharding(mesh, P("devices")),
                     jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P())))
    return self

  def _handle(self, signum, frame):
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C aborts without waiting for the checkpoint
    self.signal_name = signal.Signals(signum).name
    logging.warning("%s received: saving a checkpoint after this step, then exiting",
                    self.signal_name)

  def after_call(self) -> bool:
    """Whether the run stops after the call just dispatched (the same answer on every
    process)."""
    local = self.signal_name is not None
    if self._agree is None:
      self.requested = local
      return local
    flags_sharding, agree = self._agree
    flags = np.full((jax.local_device_count(),), local, np.int32)  # one per local device
    current = agree(jax.make_array_from_process_local_data(flags_sharding, flags))  # []
    previous, self._pending = self._pending, current
    if previous is not None and int(previous) and not self.requested:
      self.requested = True
      if not local:
        logging.warning("another process received a stop signal: saving a checkpoint after "
                        "this step, then exiting")
    return self.requested

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def check_choice(train_config) -> str:
  choice = train_config.get("on_nonfinite") or "stop"
  if choice not in NONFINITE_CHOICES:
    raise ConfigError(f"train.on_nonfinite must be one of {'|'.join(NONFINITE_CHOICES)}, "
                      f"got {choice!r}")
  return choice


def skipped_steps(opt_state) -> jax.Array | None:
  """How many steps' updates were skipped for non-finite gradients so far (a device
  scalar) with train.on_nonfinite=skip, where optax.apply_if_finite is the outermost
  transform; None otherwise."""
  return getattr(opt_state, "total_notfinite", None)


class NonFiniteGuard:
  """Finds the first step whose training loss is nan or inf, at the points where the host
  reads the device anyway (logs, evaluations, checkpoints), so a checkpoint is never
  written from a state that went bad.

  `on_nonfinite="stop"`: `check()` raises RunFailed naming the step. `"skip"`: the
  optimizer (optax.apply_if_finite) already left such steps' parameters unchanged; the
  run stops only once more than `max_skips` in a row were skipped, since their updates
  are then applied.
  """

  def __init__(self, choice: str, max_skips: int, checkpoint_directory: str):
    self.choice, self.max_skips = choice, max_skips
    self.directory = checkpoint_directory
    # (first step, device loss + gradient norm: [] or [steps]) of each call since the last
    # check; summed in the compiled check, not by a device op per step.
    self._unchecked = []
    self._all_finite = jax.jit(lambda values: jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(loss + norm)) for loss, norm in values])))

  def add(self, first_step: int, metrics) -> None:
    """Registers a dispatched call's metrics, its steps following `first_step`. A finite
    loss can still come with nan gradients (an overflow in the backward pass), whose
    update would ruin the parameters: the gradient norm is checked too."""
    if self.choice == "stop":
      self._unchecked.append((first_step, (metrics["loss"], metrics["grad_norm"])))

  def check(self, opt_state, last_saved: int | None) -> None:
    """Raises RunFailed when the run must stop for a non-finite loss."""
    saved = (f"the last checkpoint, step {last_saved}, predates it" if last_saved is not None
             else "no checkpoint was written")
    if self.choice == "skip":
      consecutive = getattr(opt_state, "notfinite_count", None)
      if consecutive is not None and int(consecutive) > self.max_skips:
        raise RunFailed(f"more than train.max_nonfinite_skips={self.max_skips} steps in a "
                        f"row had non-finite gradients; {saved} ({self.directory})")
      return
    unchecked, self._unchecked = self._unchecked, []
    if not unchecked or bool(self._all_finite([loss for _, loss in unchecked])):
      return
    for first, (loss, norm) in unchecked:  # only now fetch them one by one, to name the step
      values = np.ravel(np.add(*jax.device_get((loss, norm))))
      bad = np.flatnonzero(~np.isfinite(values))
      if bad.size:
        step = first + int(bad[0]) + 1
        raise RunFailed(
            f"the training loss or gradient became {values[bad[0]]} at step {step}; {saved} "
            f"({self.directory}). Lower train.learning_rate or raise train.warmup_steps, "
            "or set train.on_nonfinite=skip to skip such steps")

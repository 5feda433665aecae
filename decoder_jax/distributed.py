"""Joining the processes of one run into one JAX runtime (`jax.distributed`).

Every process of a multi-process run executes the same `python -m decoder_jax.train`
command. Before JAX starts a backend, `initialize(mode)` connects it to the others:

  * `off`: never (one process, whatever the environment says);
  * `on`: always, with JAX's own cluster detection (Slurm, Open MPI, Cloud TPU, ...)
    filling what the environment below does not give;
  * `auto` (the default): only where the environment names a multi-process run:
    JAX_COORDINATOR_ADDRESS is set (launch/local.sh, or by hand), or Slurm / Open MPI
    report more than one task. A plain run on a laptop stays one process.

Explicit values: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
JAX_PROCESS_ID. On CPU the processes exchange collectives through gloo (JAX's default
CPU collectives).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from decoder_jax.errors import ConfigError

MODES = ("auto", "on", "off")
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
# Environment variables of launchers that start one process per task, and how many tasks.
_TASK_COUNT_ENVS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _int_env(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def wanted(mode: str) -> bool:
  """Whether `mode` (auto|on|off) asks for jax.distributed in this environment."""
  if mode not in MODES:
    raise ConfigError(f"--distributed must be one of {'|'.join(MODES)}, got {mode!r}")
  if mode != "auto":
    return mode == "on"
  if os.environ.get(COORDINATOR_ENV):
    return True
  return any((_int_env(name) or 1) > 1 for name in _TASK_COUNT_ENVS)


def initialize(mode: str = "auto") -> bool:
  """Connects this process to the run's others when `mode` asks for it; True if it did.

  Must run before any JAX computation (the backend is created once per process).
  """
  if not wanted(mode):
    return False
  num_processes, process_id = _int_env(NUM_PROCESSES_ENV), _int_env(PROCESS_ID_ENV)
  if (num_processes is None) != (process_id is None):
    raise ConfigError(f"set both {NUM_PROCESSES_ENV} and {PROCESS_ID_ENV}, or neither (then "
                      "the cluster's own environment names them)")
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ConfigError(f"{PROCESS_ID_ENV}={process_id} is not in [0, {NUM_PROCESSES_ENV}="
                      f"{num_processes})")
  # JAX's preemption service would take SIGTERM for itself (its C++ notifier replaces the
  # handler), and orbax's sync point must then be polled at every step; the train loop's
  # own agreement (train/stopping.py) handles the signal instead.
  jax.config.update("jax_enable_preemption_service", False)
  try:
    jax.distributed.initialize(num_processes=num_processes, process_id=process_id)
  except (ValueError, RuntimeError) as e:  # no cluster found, a bad address, a timeout
    raise ConfigError(f"jax.distributed could not start ({' '.join(str(e).split())[:300]}); "
                      f"for processes on one machine use launch/local.sh, or set "
                      f"{COORDINATOR_ENV}, {NUM_PROCESSES_ENV} and {PROCESS_ID_ENV}") from e
  # Not jax.process_index(): it would start the backend before the run sets its CPU
  # device count (mesh.num_cpu_devices). The loop logs the process layout.
  logging.info("jax.distributed started (coordinator %s)",
               os.environ.get(COORDINATOR_ENV) or "from the cluster environment")
  return True


def any_process(flag: bool) -> bool:
  """Whether `flag` is true on any process (a blocking collective; `flag` itself with one
  process). Every process must call it at the same point."""
  if jax.process_count() == 1:
    return bool(flag)
  flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))  # [processes]
  return bool(np.max(flags))

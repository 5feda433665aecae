"""Orbax checkpoints of the train state and the input pipeline position.

A checkpoint step holds two items: `state` (the sharded TrainState arrays) and `data`
(the grain iterator state, JSON), so a resumed run continues on exactly the batches an
uninterrupted run would have seen.

Faults: orbax writes each step into a temporary folder and renames it when complete, so a
process killed mid-write leaves no step behind (its temporary folder is removed at the next
start); a step that cannot be read back (truncated, corrupted) is moved to
WORKDIR/checkpoints_unreadable and the previous one restored; a write that fails (a full
disk) ends the run with one line while the earlier steps stay as they were.
"""

from __future__ import annotations

import errno
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from decoder_jax import distributed, workdir as workdir_lib
from decoder_jax.workdir import UNREADABLE_DIR
from decoder_jax.errors import ConfigError, RunFailed

def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """The train state's handler: orbax's PyTree one, whose arrays are copied out whole on
  CPU devices.

  By default orbax saves a replicated array "replica-parallel": one slice per device,
  each cut by a dispatched slice op (compiled per shape on first use), so devices copy
  their parts to the host in parallel. CPU devices share the host's memory, so the
  slicing is pure cost: with the shakespeare CPU recipe's state on 2 CPU devices the
  first save blocked the step loop for 0.9 s and later ones for 0.1 s, against 0.03 s
  copying whole arrays. Elsewhere orbax's default handlers stand.
  """
  if jax.default_backend() != "cpu":
    return ocp.PyTreeCheckpointHandler()
  # orbax's default handlers for the types a train state holds, with the array one changed
  # (orbax offers no public copy of its registry; its placeholder handler, for partial
  # restores, and its per-host array-metadata store are not used here).
  scalar = ocp.type_handlers.ScalarHandler()
  registry = ocp.type_handlers.create_type_handler_registry(
      (int, scalar), (float, scalar), (np.number, scalar),
      (np.ndarray, ocp.type_handlers.NumpyHandler()),
      (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)),
      (str, ocp.type_handlers.StringHandler()))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def check_workdir(workdir: str) -> None:
  """Refuses a workdir that cannot be one (a file, or inside a file) before any work."""
  path = os.path.abspath(os.path.expanduser(workdir))
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise ConfigError(f"workdir {workdir} is not a directory ({path} is a file); choose "
                      "another --workdir")


def make_manager(workdir: str, every_steps: int, keep: int, async_writes: bool = True):
  # Every `every_steps` steps; not orbax's default extra save at a fresh run's first step.
  # The loop also saves at its last step and when stopped (SIGTERM, on any process: its
  # own agreement, train/stopping.py, not orbax's preemption policy).
  save_policy = ocp.checkpoint_managers.FixedIntervalPolicy(max(1, every_steps))
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=save_policy, max_to_keep=keep,
      enable_async_checkpointing=async_writes, create=True,
      cleanup_tmp_directories=True)  # what a killed write left
  return ocp.CheckpointManager(workdir_lib.checkpoints_dir(workdir),
                               options=options,
                               item_handlers={"state": _state_handler(),
                                              "data": ocp.JsonCheckpointHandler()})


def save(manager, step: int, state, data_state: dict, force: bool = False) -> bool:
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state)), force=force)


def save_params_replacing(directory: str, params, is_writer: bool = True) -> None:
  """Writes `params` (an orbax PyTree checkpoint) to `directory`, replacing what is there
  only once the new copy is complete, so a crash mid-save leaves the previous copy.

  Every process calls it (orbax writes each process's shards); `is_writer` (one process)
  moves the directories.
  """
  target = epath.Path(directory)
  staging, previous = _sibling(target, ".new"), _sibling(target, ".old")
  if is_writer and staging.exists():  # left by a crash during an earlier save
    staging.rmtree()
  with ocp.Checkpointer(_state_handler()) as checkpointer:
    checkpointer.save(staging, args=ocp.args.PyTreeSave(params))
  if is_writer:
    if previous.exists():
      previous.rmtree()
    if target.exists():
      target.rename(previous)
    staging.rename(target)
    if previous.exists():
      previous.rmtree()


def _sibling(path: epath.Path, suffix: str) -> epath.Path:
  return path.parent / (path.name + suffix)


def _pytree_restore(abstract) -> ocp.args.PyTreeRestore:
  """Restore arguments that place each array as `abstract` says (shape, dtype, sharding)."""
  return ocp.args.PyTreeRestore(
      abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


def restore(manager, abstract_state, step: int | None = None):
  """(state, data_state) from `step` (default: the latest); raises if shapes differ."""
  step = manager.latest_step() if step is None else step
  metadata = manager.item_metadata(step)["state"]
  problems = workdir_lib.shape_mismatches(getattr(metadata, "tree", metadata), abstract_state)
  if problems:
    more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
    raise ConfigError(
        f"the checkpoint at {manager.directory}/{step} was written by a model or optimizer of "
        f"a different shape than the current config builds ({'; '.join(problems[:3])}{more}); "
        "use a fresh --workdir or the config that wrote this checkpoint")
  restored = manager.restore(step, args=ocp.args.Composite(
      state=_pytree_restore(abstract_state), data=ocp.args.JsonRestore()))
  return restored["state"], restored["data"]


def restore_readable(manager, abstract_state, workdir: str):
  """(state, data_state) of the newest step that reads back whole, on every process.

  A step that fails to read (a truncated or corrupted file) is moved to
  WORKDIR/checkpoints_unreadable/<step>, with a warning, and the one before it is tried;
  a step written by a differently shaped model is the user's to fix (ConfigError).
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored, failure = restore(manager, abstract_state, step), None
    except ConfigError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore read errors
      restored, failure = None, e
    if not distributed.any_process(failure is not None):
      return restored
    # tensorstore's messages end in a dump of the array spec: keep what comes before it
    reason = (" ".join(str(failure).split()).split(" See full")[0][:200] if failure
              else "unreadable on another process")
    aside = os.path.join(os.path.abspath(workdir), UNREADABLE_DIR, str(step))
    logging.warning("the checkpoint at step %d cannot be read (%s): moved to %s, trying the "
                    "one before it", step, reason, aside)
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      shutil.rmtree(aside, ignore_errors=True)  # one left by an earlier fallback
      shutil.move(os.path.join(manager.directory, str(step)), aside)
    multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
    manager.reload()
  raise RunFailed(f"no checkpoint in {manager.directory} can be read (the unreadable ones "
                  f"are in {os.path.join(workdir, UNREADABLE_DIR)}); use a fresh --workdir")


def _disk_full(e: BaseException) -> bool:
  """Whether `e` (or what caused it) is a write refused for lack of space: OSError ENOSPC
  or the same from tensorstore, which orbax re-raises as ValueError with the OS code."""
  while e is not None:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "No space left on device" in str(e) or "os_error_code='28'" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def write_failure(e: BaseException, manager) -> RunFailed | None:
  """The one-line error for a write into the workdir (a checkpoint, the metrics) that
  failed for lack of space, else None (a bug or another fault keeps its traceback)."""
  if not _disk_full(e):
    return None
  manager.reload()  # the steps on disk now, without the one that failed
  steps = manager.all_steps()
  kept = (f"the last complete checkpoint, step {max(steps)}, is intact" if steps
          else "no checkpoint was complete")
  return RunFailed(f"writing into {os.path.dirname(manager.directory)} failed: no space left "
                   f"on the device; {kept}. Free space (or lower train.keep_checkpoints) and "
                   "run the same command again to resume")

"""Orbax checkpoints of the train state and the input pipeline position.

A checkpoint step holds two items: `state` (the sharded TrainState arrays) and `data`
(the grain iterator state, JSON), so a resumed run continues on exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def make_manager(workdir: str, every_steps: int, keep: int, async_writes: bool = True):
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=max(1, every_steps), max_to_keep=keep,
      enable_async_checkpointing=async_writes, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options, item_names=("state", "data"))


def save(manager, step: int, state, data_state: dict, force: bool = False) -> bool:
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)


def _shape_mismatches(saved_tree, abstract_state) -> list[str]:
  """Paths whose saved shape (or presence) differs from what the current config builds."""
  saved = {jax.tree_util.keystr(p): tuple(getattr(leaf, "shape", ()))
           for p, leaf in jax.tree_util.tree_leaves_with_path(saved_tree)}
  wanted = {jax.tree_util.keystr(p): tuple(leaf.shape)
            for p, leaf in jax.tree_util.tree_leaves_with_path(abstract_state)}
  problems = [f"{k}: checkpoint {saved[k]} vs config {wanted[k]}"
              for k in sorted(saved.keys() & wanted.keys()) if saved[k] != wanted[k]]
  problems += [f"{k}: in the config, not in the checkpoint" for k in sorted(wanted.keys() - saved.keys())]
  problems += [f"{k}: in the checkpoint, not in the config" for k in sorted(saved.keys() - wanted.keys())]
  return problems


def restore(manager, abstract_state, step: int | None = None):
  """(state, data_state) from `step` (default: the latest); raises if shapes differ."""
  step = manager.latest_step() if step is None else step
  metadata = manager.item_metadata(step)["state"]
  saved_tree = getattr(metadata, "tree", metadata)
  as_dicts = lambda t: jax.tree_util.tree_map(lambda x: x, t)  # noqa: E731
  problems = _shape_mismatches(_to_plain(saved_tree), _to_plain(as_dicts(abstract_state)))
  if problems:
    listed = "\n  ".join(problems[:20])
    raise ValueError(
        f"the checkpoint at {manager.directory}/{step} was written by a model or optimizer of "
        f"a different shape than the current config builds:\n  {listed}\n"
        "Use a fresh --workdir or the config that wrote this checkpoint.")
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return restored["state"], restored["data"]


def _to_plain(tree):
  """Nested dicts keyed by field name, so saved metadata and live dataclasses compare."""
  if hasattr(tree, "__dataclass_fields__"):
    return {k: _to_plain(getattr(tree, k)) for k in tree.__dataclass_fields__
            if k != "tx"}
  if isinstance(tree, dict):
    return {str(k): _to_plain(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
    return {str(i): _to_plain(v) for i, v in enumerate(tree)}
  if hasattr(tree, "_fields"):  # namedtuples (optax states)
    return {k: _to_plain(getattr(tree, k)) for k in tree._fields}
  return tree

"""A training workdir on disk: the names of its files, what they hold, and its params read
back without building an optimizer.

Layout (written by `python -m decoder_jax.train`, read by inference, evaluation and a
resumed run):

  WORKDIR/model_config.json   the model's ModelConfig (architecture and training choices)
  WORKDIR/config.json         the run's whole config
  WORKDIR/tokenizer.json      the tokenizer (data/tokenizers.py; plus its model files)
  WORKDIR/checkpoints/<step>  orbax steps: `state` (the TrainState) and `data` (the
                              input pipeline position); train/checkpoint.py writes them
  WORKDIR/best, best.json     a task run's best params by eval.metric, and which step

This module sits below both train/ and inference: it imports no training code.
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from decoder_jax import progress, sharding
from decoder_jax.data import tokenizers
from decoder_jax.errors import ConfigError, NotFound
from decoder_jax.model import ModelConfig, init_inputs

MODEL_CONFIG_FILE = "model_config.json"
RUN_CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
BEST_FILE = "best.json"
UNREADABLE_DIR = "checkpoints_unreadable"  # steps that failed to read back, moved aside


@dataclasses.dataclass
class TrainedModel:
  """A model ready to decode: from a workdir (inference.load_trained) or a pretrained
  source (decoder_jax.load_pretrained)."""
  config: ModelConfig
  params: dict
  tokenizer: object
  step: int = 0  # the training step of the checkpoint (0 for imported weights)


def with_dtype(trained: TrainedModel, dtype: str | None) -> TrainedModel:
  """The model run in `dtype`: parameters cast to it (keeping their shardings), matmuls
  and the KV cache in it. None keeps the model as it is."""
  if dtype is None or (trained.config.dtype == dtype and trained.config.param_dtype == dtype):
    return trained
  config = dataclasses.replace(trained.config, dtype=dtype, param_dtype=dtype)
  cast = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), p))
  return dataclasses.replace(trained, config=config, params=cast(trained.params))


def is_training_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)) and os.path.exists(
      os.path.join(path, MODEL_CONFIG_FILE))


def read_json(workdir: str, name: str) -> dict:
  """WORKDIR/name as a dict; NotFound or ConfigError (one line) when it is not one."""
  path = os.path.join(workdir, name)
  if not os.path.isfile(path):
    raise NotFound(f"{path} not found: is {workdir} a decoder_jax training workdir? "
                   "(python -m decoder_jax.train writes it)")
  try:
    with open(path, encoding="utf-8") as f:
      values = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError):
    values = None  # not JSON: refused below, like JSON that is not an object
  if not isinstance(values, dict):
    raise ConfigError(f"{path} is not the JSON object decoder_jax writes; is {workdir} a "
                      "decoder_jax training workdir?")
  return values


def read_model_config(workdir: str) -> ModelConfig:
  return ModelConfig.from_dict(read_json(workdir, MODEL_CONFIG_FILE))


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(read_json(workdir, RUN_CONFIG_FILE))


def read_tokenizer(workdir: str):
  return tokenizers.load_tokenizer(workdir)


def write_run_files(workdir: str, model_config: ModelConfig, config, tokenizer) -> None:
  """The files a run's first start writes beside its checkpoints (one process writes)."""
  with open(os.path.join(workdir, MODEL_CONFIG_FILE), "w") as f:
    json.dump(model_config.to_dict(), f, indent=2)
  with open(os.path.join(workdir, RUN_CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  tokenizers.save_tokenizer(tokenizer, workdir)


def checkpoints_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)


def latest_step(workdir: str) -> int | None:
  """The newest complete checkpoint's step in `workdir`, None if it holds none. Reads
  only: a missing workdir is not created."""
  directory = checkpoints_dir(workdir)
  if not os.path.isdir(directory):
    return None
  steps = ocp.path.step.checkpoint_steps(directory)  # finalized ones: no partial write
  return max(steps) if steps else None


def abstract_params(model, mesh):
  """(ShapeDtypeStructs of `model`'s params laid out on `mesh` by the logical-axis rules,
  their NamedShardings)."""
  boxed = jax.eval_shape(
      lambda: model.init(jax.random.key(0), *init_inputs(model.config)))["params"]
  shardings = sharding.shardings_for(boxed, mesh)
  abstract = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  return abstract, shardings


def _path_name(path) -> str:
  """'opt_state/1/0/mu/...' for a live dataclass/namedtuple path or orbax's dict/list one."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _shapes(tree) -> dict[str, tuple]:
  return {_path_name(p): tuple(leaf.shape)
          for p, leaf in jax.tree_util.tree_leaves_with_path(tree) if hasattr(leaf, "shape")}


def shape_mismatches(saved_tree, abstract) -> list[str]:
  """Paths whose saved shape (or presence) differs from what the current config builds."""
  saved, wanted = _shapes(saved_tree), _shapes(abstract)
  problems = [f"{k}: checkpoint {saved[k]} vs config {wanted[k]}"
              for k in sorted(saved.keys() & wanted.keys()) if saved[k] != wanted[k]]
  problems += [f"{k}: in the config, not in the checkpoint"
               for k in sorted(wanted.keys() - saved.keys())]
  problems += [f"{k}: in the checkpoint, not in the config"
               for k in sorted(saved.keys() - wanted.keys())]
  return problems


def _restore_args(abstract) -> dict:
  return ocp.checkpoint_utils.construct_restore_args(abstract)


def restore_params(workdir: str, abstract, step: int | None = None):
  """(params, step) of checkpoint `step` (default: the latest): only the TrainState's
  params are read (an orbax partial restore), shaped and placed as `abstract` says."""
  step = latest_step(workdir) if step is None else step
  if step is None:
    raise NotFound(f"no checkpoint in {checkpoints_dir(workdir)}: the run has not saved one "
                   "yet")
  scalar = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  wanted = {"params": abstract, "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=scalar)}
  path = epath.Path(checkpoints_dir(workdir)) / str(step) / "state"
  with (progress.all_at_once(f"restoring {workdir}", len(jax.tree.leaves(abstract)), "arrays"),
        ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer):
    saved = checkpointer.metadata(path).item_metadata.tree
    problems = shape_mismatches(saved.get("params", {}), abstract)
    if problems:
      more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
      raise ConfigError(f"the checkpoint at {path.parent} was written by a model of a "
                        f"different shape than {MODEL_CONFIG_FILE} builds "
                        f"({'; '.join(problems[:3])}{more})")
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        wanted, restore_args=_restore_args(wanted), partial_restore=True))
  return restored["params"], int(restored["step"])


def restore_params_dir(directory: str, abstract):
  """The params tree saved whole into `directory` (WORKDIR/best, a converted model's
  params/), shaped and placed as `abstract` says. A directory caught mid-replacement
  (train/checkpoint.save_params_replacing) is read from its previous copy."""
  path = epath.Path(directory)
  previous = path.parent / (path.name + ".old")
  if not path.exists() and previous.exists():
    path = previous  # a crash fell between the replacing save's renames
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        abstract, restore_args=_restore_args(abstract)))

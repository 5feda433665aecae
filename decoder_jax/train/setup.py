"""What a run is made of, built from its config: model, tokenizer, data, parameter halves.

`build_run` is shared by training (train/loop.py) and evaluation (decoder_jax.evaluate),
so both see the same architecture, tokenizer, task and trainable/frozen split.

Parameters are split in two (see train/steps.py): the trainable half lives in the
TrainState (optimizer state, checkpoints) and the frozen half beside it. With a
parameter-efficient method (`config.model.lora`, `.adalora`, `.adapter`, `.prompt`,
`.prefix`; decoder_jax.peft) only the method's parameters and any classification head
are trainable, the frozen base comes from `config.init_from` on every start (such a
checkpoint stores the trainable half, config.json the reference to the base) and may be
held in `config.train.frozen_dtype` (e.g. bfloat16). Without one everything is trainable.

The model is a Decoder, or an EncoderDecoder when model.encoder_layers > 0 (a seq2seq task,
trained from scratch or from config.init_from). A seq2seq task from scratch trains its joint
vocabulary on the first start (tasks.train_vocabulary, in memory); the workdir keeps it
(workdir.write_run_files) for every later start.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import traverse_util

from decoder_jax import peft, sharding, workdir as workdir_lib
from decoder_jax.data import pipeline, tasks
from decoder_jax.errors import ConfigError
from decoder_jax.model import Decoder, EncoderDecoder, ModelConfig, build, init_inputs
from decoder_jax.model.config import with_training_choices
from decoder_jax.train import init_from, optimizer, state as state_lib


def resolve_model_config(model_section, tokenizer) -> ModelConfig:
  """The model config with vocab_size filled from the tokenizer when left as None."""
  values = model_section.to_dict()
  if values.get("vocab_size") is None:
    values["vocab_size"] = tokenizer.vocab_size
  elif values["vocab_size"] < tokenizer.vocab_size:
    raise ConfigError(f"model.vocab_size={values['vocab_size']} is smaller than the tokenizer's "
                      f"vocabulary ({tokenizer.vocab_size}); leave it None to use the tokenizer's")
  return ModelConfig.from_dict(values)


def check_train_choices(train_config) -> None:
  """train.schedule and train.label_smoothing, checked before anything is written."""
  optimizer.learning_rate_schedule(train_config)  # an unknown schedule raises
  smoothing = train_config.get("label_smoothing") or 0.0
  if not 0.0 <= smoothing < 1.0:
    raise ConfigError(f"train.label_smoothing must lie in [0, 1); got {smoothing}")


def uses_peft(config) -> bool:
  """Whether the run's model section sets a parameter-efficient method (its checkpoints
  then hold the trainable half only, the base comes from config.init_from)."""
  return any(config.model.get(name) is not None for name in peft.METHODS)


def make_optimizer(train_config, model_config: ModelConfig):
  """The run's optimizer: AdamW (train/optimizer.py), wrapped in AdaLoRA's rank
  allocation when the model uses AdaLoRA, and in optax.apply_if_finite with
  train.on_nonfinite=skip."""
  tx = optimizer.make_optimizer(train_config)
  if model_config.adalora is not None:
    tx = peft.adalora.allocator(tx, model_config, train_config.num_steps)
  if train_config.get("on_nonfinite") == "skip":  # outermost: nothing updates on a bad step
    tx = optax.apply_if_finite(tx, train_config.get("max_nonfinite_skips") or 10)
  return tx


@dataclasses.dataclass
class Run:
  model_config: ModelConfig
  model: Decoder | EncoderDecoder
  tokenizer: Any
  datasets: Any  # pipeline.Datasets or tasks.TaskDatasets
  seq_len: int
  trainable: Any  # predicate (path, leaf) -> bool
  boxed_params: Any  # eval_shape of the full params, nn.Partitioned leaves
  start: Any = None  # init_from.load(...) result (TrainedModel) when the source was read

  @property
  def task(self):
    return getattr(self.datasets, "task", None)


def build_run(config, workdir: str | None, mesh, *, need_base: bool, resuming: bool,
              with_data: bool = True) -> Run:
  """The run's model, tokenizer and data (`run.datasets` None without `with_data`).

  The source of `config.init_from` is read when `need_base` (a first start, or a LoRA
  run, whose frozen base is not in its checkpoints); otherwise the architecture and
  tokenizer come from `workdir`, where the first start saved them. A seq2seq task without
  init_from trains from scratch: its vocabulary is trained on a first start (nothing
  written) and read from `workdir` when `resuming` (or without data).
  """
  check_train_choices(config.train)
  start = None
  tokenizer = None
  source = config.get("init_from")
  if source and (need_base or not resuming):
    start = init_from.load(source, config.model, mesh)
    model_config, tokenizer = start.config, start.tokenizer
    logging.info("initialised from %s", source)
  elif source:
    model_config = with_training_choices(workdir_lib.read_model_config(workdir), config.model)
    tokenizer = workdir_lib.read_tokenizer(workdir)
  task_config = config.get("task")
  seq2seq = task_config is not None and task_config.get("kind") == "seq2seq"
  if task_config is not None and tokenizer is None:
    if not seq2seq:
      raise ConfigError("a task config (config.task) fine-tunes a pretrained model: set "
                        "config.init_from to its checkpoint (gguf:FILE, hf:DIR, a converted "
                        "DIR)")
    tokenizer = (workdir_lib.read_tokenizer(workdir) if resuming or not with_data
                 else tasks.train_vocabulary(task_config, config.seed))
    model_config = resolve_model_config(config.model, tokenizer)
  elif seq2seq and task_config.get("vocab_size") is not None:
    logging.warning("task.vocab_size=%s is unused: the vocabulary is config.init_from's",
                    task_config.vocab_size)
  train_cfg = config.train
  if not with_data:
    if tokenizer is None:
      raise ConfigError("without data, the tokenizer must come from config.init_from or the "
                        "workdir")
    datasets = None
    seq_len = (task_config.max_length if task_config is not None
               else config.data.get("seq_len") or model_config.max_length)
  elif task_config is not None:
    seq_len = task_config.max_length
    datasets = tasks.make_task_datasets(task_config, tokenizer,
                                        global_batch_size=train_cfg.batch_size,
                                        eval_batch_size=config.data.eval_batch_size,
                                        seed=config.seed,
                                        encoder_decoder=model_config.is_encoder_decoder)
  else:
    max_length = model_config.max_length if tokenizer is not None else config.model.max_length
    seq_len = config.data.get("seq_len") or max_length
    datasets = pipeline.make_datasets(config.data, seq_len=seq_len,
                                      global_batch_size=train_cfg.batch_size, seed=config.seed,
                                      tokenizer=tokenizer)
  if tokenizer is None:
    model_config = resolve_model_config(config.model, datasets.tokenizer)
    tokenizer = datasets.tokenizer
  if seq_len > model_config.max_length and not model_config.use_rope:
    raise ConfigError(f"sequence length {seq_len} exceeds the model's max_length "
                      f"({model_config.max_length})")
  if model_config.peft_method is not None:
    if not source:
      raise ConfigError(f"model.{model_config.peft_method} adapts pretrained weights: set "
                        "config.init_from")
    peft.check(model_config, seq_len=seq_len)
    if model_config.adalora is not None:
      peft.adalora.check_schedule(model_config.adalora, train_cfg.num_steps)
  if model_config.is_encoder_decoder and not seq2seq:
    raise ConfigError("an encoder-decoder (model.encoder_layers > 0) trains on a seq2seq "
                      "task: set config.task with task.kind='seq2seq'")
  model = build(model_config, num_labels=tasks.head_labels(task_config))
  dummy = init_inputs(model_config)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy))["params"]
  return Run(model_config, model, tokenizer, datasets, seq_len,
             peft.trainable_predicate(model_config), boxed, start)


def abstract_state(run: Run, tx, mesh, frozen_dtype: str | None = None):
  """(abstract TrainState, its shardings, frozen abstract, frozen shardings); the frozen
  half in `frozen_dtype` (train.frozen_dtype) if set."""
  trainable_boxed, frozen_boxed = peft.split(run.boxed_params, run.trainable)
  boxed_state = jax.eval_shape(
      lambda p: state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                     opt_state=tx.init(p), tx=tx), trainable_boxed)
  state_shardings = sharding.shardings_for(boxed_state, mesh)
  frozen_shardings = sharding.shardings_for(frozen_boxed, mesh)
  cast = None if frozen_dtype is None else jnp.dtype(frozen_dtype)

  def abstract(tree, shardings, dtype=None):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype or s.dtype,
                                                           sharding=sh),
                        nn.unbox(tree), shardings)

  return (abstract(boxed_state, state_shardings), state_shardings,
          abstract(frozen_boxed, frozen_shardings, cast), frozen_shardings)


def run_once(fn, *args):
  """Compiles and calls jitted `fn` once. On CPU with XLA's backend optimisation off: a
  random init compiles in about 1.5 s instead of 3.5 s on 2 cores and runs in tens of
  milliseconds either way, so a program that runs once is cheaper unoptimised."""
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  return fn.lower(*args).compile(compiler_options=options)(*args)


def initial_params(run: Run, mesh, rng):
  """The full starting params: the source's plus fresh leaves it lacks (LoRA adapters, a
  classification head), or a random init when there is no source."""
  shardings = sharding.shardings_for(run.boxed_params, mesh)
  dummy = init_inputs(run.model_config)
  if run.start is None:
    init = jax.jit(lambda r: nn.unbox(run.model.init(r, *dummy))["params"],
                   out_shardings=shardings)
    return run_once(init, rng)
  have = traverse_util.flatten_dict(run.start.params)
  flat_shardings = traverse_util.flatten_dict(shardings)
  wanted = traverse_util.flatten_dict(nn.unbox(run.boxed_params))
  missing = [path for path in wanted if path not in have]
  extra = [path for path in have if path not in wanted]
  if extra:
    raise ConfigError(f"the source's params have leaves this model lacks: "
                      f"{['/'.join(p) for p in extra[:5]]}")

  # Under jit, XLA computes only the missing leaves of the full init (no second base copy).
  @jax.jit
  def fresh(r):
    flat = traverse_util.flatten_dict(nn.unbox(run.model.init(r, *dummy))["params"])
    return {path: flat[path] for path in missing}

  new = fresh(rng)
  if run.model_config.peft_method is not None:  # e.g. a soft prompt from the vocabulary
    new.update(peft.init_from_base(run.model_config,
                                   traverse_util.unflatten_dict({**have, **new}),
                                   jax.random.fold_in(rng, 1)))
  new = {path: jax.device_put(leaf, flat_shardings[path]) for path, leaf in new.items()}
  if missing:
    logging.info("new parameters (not in the source): %s",
                 sorted({"/".join(p[-3:-1] if len(p) > 2 else p[:-1]) for p in missing})[:8])
  return traverse_util.unflatten_dict({**have, **new})


def split_params(run: Run, params, frozen_shardings, frozen_dtype: str | None = None):
  """(trainable, frozen) halves; the frozen one cast to `frozen_dtype` (train.frozen_dtype)
  if set."""
  trainable, frozen = peft.split(params, run.trainable)
  cast = None if frozen_dtype is None else jnp.dtype(frozen_dtype)
  if cast is not None:
    frozen = jax.jit(lambda f: jax.tree.map(lambda x: x.astype(cast), f),
                     out_shardings=frozen_shardings)(frozen)
  return trainable, frozen

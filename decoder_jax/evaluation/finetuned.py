"""A fine-tuned model (or its pretrained base) scored on a task's evaluation set.

The library behind `python -m decoder_jax.evaluate`, for notebooks and scripts:
`load_finetuned` (base from config.init_from + the workdir's trainable half),
`merged_model` (the method merged where it can be, ready for decoding) and `evaluate` (one JSON-able dict).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time

import jax

from decoder_jax import decoding, inference, losses, peft, sharding, workdir as workdir_lib
from decoder_jax.data import task_sources, tasks
from decoder_jax.errors import ConfigError, NotFound
from decoder_jax.evaluation import metrics, task_eval
from decoder_jax.model import Decoder, ModelConfig, build
from decoder_jax.model.config import with_training_choices


def _eval_set(datasets, task_config, split, source_file, reference_file, tsv_file,
              eval_batch_size, max_examples):
  """(EvalSet, description of where the examples came from)."""
  task = datasets.task
  if source_file or reference_file:
    if not (source_file and reference_file):
      raise ConfigError("--source_file and --reference_file go together")
    if isinstance(task, tasks.ClassificationTask):
      raise ConfigError("--source_file/--reference_file are for translation configs")
    raw, where = task_sources.read_parallel_pair(source_file, reference_file), source_file
  elif tsv_file:
    if not isinstance(task, tasks.ClassificationTask):
      raise ConfigError("--tsv_file is for classification configs")
    config = tasks.with_defaults(task_config)
    text_columns = config.text_field or ("content", "sentence")
    raw = [{"text": text, "label": label} for text, label in task_sources.read_labelled_tsv(
        pathlib.Path(tsv_file), config.label_field, text_columns, config.label_names)]
    where = tsv_file
  else:
    split = split or datasets.eval_split
    where = f"{task_config.source}:{split}"
    if split in datasets.eval_sets and not max_examples:
      return datasets.eval_sets[split], where
    raw = tasks.load_examples(tasks.with_defaults(task_config), split, None)
  raw = raw[:max_examples] if max_examples else raw
  eval_set = tasks.make_eval_set(task, raw, where, split="eval", max_length=task_config.max_length,
                                 eval_batch_size=eval_batch_size, rows=slice(0, eval_batch_size),
                                 buckets=datasets.buckets, pad_id=datasets.pad_id)
  return eval_set, where


@dataclasses.dataclass
class FinetunedRun:
  """What evaluation needs of a fine-tuning run: its model, tokenizer and task data."""
  model_config: ModelConfig
  model: Decoder
  tokenizer: object
  datasets: tasks.TaskDatasets

  @property
  def task(self):
    return self.datasets.task


def load_finetuned(config, workdir: str | None, *, zero_shot: bool = False,
                   weights: str = "best", read_splits: bool = True):
  """(run, params, what) for a task config: the base from config.init_from plus the
  trainable half from `workdir` ("best" or "latest" checkpoint), or the pretrained model
  alone with `zero_shot`. `params` is the full tree (the method unmerged); `what` says
  which weights these are. A seq2seq run trained from scratch has no base; without
  `read_splits` (examples from files) none of its data's splits is read."""
  if config.get("task") is None:
    raise ConfigError("--config must be a task config (with a task section), e.g. "
                      "configs/smollm2_sst2.py:lora")
  if not zero_shot:  # checked before the model loads: a mistyped workdir fails at once
    if not workdir:
      raise ConfigError("give --workdir of a fine-tuning run, or --zero_shot to score the "
                        "pretrained model (config.init_from)")
    if not os.path.exists(os.path.join(workdir, workdir_lib.MODEL_CONFIG_FILE)):
      raise NotFound(f"{workdir} holds no training run ({workdir_lib.MODEL_CONFIG_FILE} is "
                     "missing); pass the --workdir of a fine-tuning run, or --zero_shot")
    if workdir_lib.latest_step(workdir) is None:
      raise NotFound(f"no checkpoint in {workdir} yet (use --zero_shot for the pretrained "
                     "model)")
  from_scratch = config.task.get("kind") == "seq2seq" and not config.get("init_from")
  if not config.get("init_from") and not from_scratch:
    raise ConfigError("a task config (config.task) fine-tunes a pretrained model: set "
                      "config.init_from to its checkpoint (gguf:FILE, hf:DIR, a converted DIR)")
  if from_scratch and zero_shot:
    raise ConfigError("--zero_shot scores config.init_from, and this config trains from "
                      "scratch: give its --workdir")
  sharding.split_host_cpu(config.mesh.get("num_cpu_devices"))
  mesh = sharding.make_mesh(config.mesh)
  if from_scratch:
    return _load_from_scratch(config, workdir, weights, mesh, read_splits)
  model_section = config.model.to_dict()
  if zero_shot:
    model_section.update(dict.fromkeys(peft.METHODS))  # the pretrained model alone
  start = inference.load_source(config.init_from, mesh)
  base = inference.laid_out_as(start, with_training_choices(start.config, model_section), mesh)
  model = Decoder(base.config, num_labels=tasks.head_labels(config.task))
  if zero_shot and model.num_labels:
    raise ConfigError("zero-shot needs task.mode=label_words: a classification head is "
                      "untrained before fine-tuning")
  datasets = tasks.make_task_datasets(config.task, base.tokenizer,
                                      global_batch_size=config.train.batch_size,
                                      eval_batch_size=config.data.eval_batch_size,
                                      seed=config.seed)
  run = FinetunedRun(base.config, model, base.tokenizer, datasets)
  what = {"weights": "zero-shot (config.init_from)", "source": config.init_from}
  if zero_shot:
    return run, base.params, what
  trainable, frozen = inference.split_abstract(model, mesh)
  frozen = inference.frozen_from(base.params, frozen, config.train.get("frozen_dtype"))
  trainable, what = _restore_trainable(workdir, weights, trainable)
  return run, peft.combine(trainable, frozen), what


def with_run_source(config, workdir: str | None):
  """`config` with task.source, when unset (e.g. $DECODER_JAX_DATA not set here), taken
  from the run config the training wrote in `workdir`: the data the run trained on."""
  if config.get("task") is None or config.task.get("source") or not workdir:
    return config
  try:
    source = workdir_lib.read_run_config(workdir).get("task", {}).get("source")
  except (FileNotFoundError, NotFound, ConfigError):
    return config
  if not source:
    return config
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.task.source = source
  return config


def _load_from_scratch(config, workdir: str, weights: str, mesh, read_splits: bool):
  """load_finetuned's (run, params, what) for a run trained from scratch (a seq2seq task):
  the architecture and the vocabulary the run trained are the workdir's. Without
  `read_splits` no split of task.source is read (examples come from files)."""
  model_config = workdir_lib.read_model_config(workdir)
  tokenizer = workdir_lib.read_tokenizer(workdir)
  model = build(model_config)
  if read_splits:
    datasets = tasks.make_task_datasets(config.task, tokenizer,
                                        global_batch_size=config.train.batch_size,
                                        eval_batch_size=config.data.eval_batch_size,
                                        seed=config.seed,
                                        encoder_decoder=model_config.is_encoder_decoder)
  else:
    datasets = tasks.eval_only_datasets(config.task, tokenizer,
                                        encoder_decoder=model_config.is_encoder_decoder)
  abstract, _ = workdir_lib.abstract_params(model, mesh)
  params, what = _restore_trainable(workdir, weights, abstract)
  return FinetunedRun(model_config, model, tokenizer, datasets), params, what


def merged_model(run, params):
  """An inference.TrainedModel of a loaded run with its method merged where it can be, for
  inference.generate_batch / complete or evaluation.generation.generate_texts."""
  config, params = task_eval.plain_model(run.model_config, params)
  return inference.TrainedModel(config, params, run.tokenizer)


def evaluate(config, workdir: str | None, *, zero_shot: bool = False, weights: str = "best",
             split=None, source_file=None, reference_file=None, tsv_file=None, num_beams=None,
             max_new_tokens=None, max_examples=None, output=None, config_name=None,
             num_replies: int = 3) -> dict:
  """The metrics of the run in `workdir` (or the pretrained model) on one evaluation set.

  A chat task reports the perplexity of the assistant turns and `num_replies` greedy
  replies to held-out conversations, beside the replies the people wrote.
  """
  config = with_run_source(config, workdir)
  run, params, scored = load_finetuned(config, workdir, zero_shot=zero_shot, weights=weights,
                                       read_splits=not (source_file or reference_file))
  eval_config = (config.get("eval") or task_eval.default_eval_config()).copy_and_resolve_references()
  with eval_config.unlocked():
    if num_beams is not None:
      eval_config.num_beams = num_beams
    if max_new_tokens is not None:
      eval_config.max_new_tokens = max_new_tokens
    eval_config.max_generation_examples = None
  eval_set, where = _eval_set(run.datasets, config.task, split, source_file, reference_file,
                              tsv_file, config.data.eval_batch_size, max_examples)
  start = time.perf_counter()
  result = {"config": config_name, "examples_from": where, **scored}
  task = run.datasets.task
  if isinstance(task, tasks.ChatTask):
    result["loss"] = _mean_loss(run.model, params, eval_set.batch_list)
    result.update(perplexity=math.exp(min(result["loss"], 50.0)),
                  examples=len(eval_set.examples),
                  replies=_sampled_replies(run, params, eval_set.examples[:num_replies],
                                           eval_config.max_new_tokens))
  elif isinstance(task, tasks.ClassificationTask):
    predictions, labels, loss = task_eval.classification_predictions(
        run.model, params, task, (dict(b) for b in eval_set.batch_list))
    result.update(loss=loss, accuracy=metrics.accuracy(predictions, labels),
                  macro_f1=metrics.macro_f1(predictions, labels, task.num_labels),
                  examples=len(labels), mode=task.mode)
  else:
    result["loss"] = _mean_loss(run.model, params, eval_set.batch_list)
    examples = eval_set.examples
    bleu, hypotheses = task_eval.bleu_of(
        run.model_config, params, run.tokenizer, examples,
        max_new_tokens=eval_config.max_new_tokens, num_beams=eval_config.num_beams,
        batch_size=eval_config.generation_batch_size, length_penalty=eval_config.length_penalty)
    result.update(bleu=bleu, examples=len(examples), tokenizer="sacrebleu 13a (default)",
                  decoding={"num_beams": eval_config.num_beams,
                            "max_new_tokens": eval_config.max_new_tokens,
                            "length_penalty": eval_config.length_penalty,
                            "strategy": "beam" if eval_config.num_beams > 1 else "greedy"})
    if output:
      with open(output, "w") as f:
        for example, hypothesis in zip(examples, hypotheses):
          f.write(json.dumps({"source": example.get("source"), "hypothesis": hypothesis,
                              "reference": example["reference"]}, ensure_ascii=False) + "\n")
  result["seconds"] = round(time.perf_counter() - start, 1)
  return result


def _sampled_replies(run, params, examples, max_new_tokens: int) -> list[dict]:
  """Greedy replies to each example's context (the conversation before its last
  assistant turn)."""
  if not examples:
    return []
  trained = merged_model(run, params)
  ends = inference.end_ids(run.tokenizer)
  out = inference.generate_ids(trained, [list(e["prompt_ids"]) for e in examples],
                               max_new_tokens=max_new_tokens, sampler=decoding.Greedy(),
                               stop_ids=ends[1:], eos_id=ends[0] if ends else None)
  replies = []
  for example, [reply] in zip(examples, out):
    ids = [int(t) for t in reply.tokens[:reply.length] if int(t) not in ends]
    replies.append({"said": example["context"][-1]["content"],
                    "reply": run.tokenizer.decode(ids).strip(),
                    "reference": example["reference"]})
  return replies


def _mean_loss(model, params, batches) -> float:
  """Mean weighted loss (on the responses / labels) over the eval batches."""
  loss_sums = jax.jit(lambda p, b: losses.loss_sums(model, p, b))
  return losses.mean_loss(lambda batch: loss_sums(params, dict(batch)), batches)


def _restore_trainable(workdir, weights, abstract):
  """(trainable params, what they are): WORKDIR/best when asked for and kept, else the
  latest checkpoint's."""
  best_json = os.path.join(workdir, workdir_lib.BEST_FILE)
  if weights == "best" and os.path.exists(best_json):
    with open(best_json) as f:
      best = json.load(f)
    restored = workdir_lib.restore_params_dir(
        os.path.join(os.path.abspath(workdir), workdir_lib.BEST_DIR), abstract)
    return restored, {"weights": f"best by {best['metric']} ({best['value']:.4f}) at step "
                                 f"{best['step']}", "workdir": workdir}
  params, step = workdir_lib.restore_params(workdir, abstract)
  return params, {"weights": f"latest checkpoint, step {step}", "workdir": workdir}

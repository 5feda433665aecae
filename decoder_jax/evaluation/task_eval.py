"""Task metrics of a model on an evaluation set: BLEU of generations, or classification
accuracy and macro-F1. Used in the training loop and by `python -m decoder_jax.evaluate`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from decoder_jax import inference, losses as losses_lib, peft, seq2seq
from decoder_jax.data import tasks as tasks_lib
from decoder_jax.evaluation import generation, metrics
from decoder_jax.model import Decoder, ModelConfig


def default_eval_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # The metric that picks the best checkpoint (kept in workdir/best): "bleu", "accuracy",
  # "macro_f1" (higher is better) or "loss" (lower is better).
  config.metric = "loss"
  config.num_beams = 1  # Generation for BLEU: 1 = greedy.
  config.length_penalty = 1.0
  config.max_new_tokens = 64
  config.generation_batch_size = 32
  config.max_generation_examples = ml_collections.config_dict.placeholder(int)  # None: all
  config.keep_best = True
  return config


HIGHER_IS_BETTER = {"bleu": True, "accuracy": True, "macro_f1": True, "loss": False,
                    "perplexity": False}


def plain_model(model_config: ModelConfig, params):
  """(config, params) ready to decode: the fine-tuning method merged where it can be
  (peft.for_inference)."""
  merged, config = peft.for_inference(params, model_config)
  return config, merged


def bleu_of(model_config: ModelConfig, params, tokenizer, examples, *, max_new_tokens: int,
            num_beams: int = 1, batch_size: int = 32, length_penalty: float = 1.0,
            limit: int | None = None) -> tuple[float, list[str]]:
  """(corpus BLEU, hypotheses) of greedy or beam generations from each example's prompt
  (an encoder-decoder: from its source_ids).

  A hypothesis ends at its first line break: the prompts hold one sentence per line, and
  a model that has not learnt to stop (zero-shot) would otherwise be scored on whatever
  it writes after its translation.
  """
  examples = examples[:limit] if limit else examples
  if model_config.is_encoder_decoder:  # the source goes to the encoder, not into a prompt
    trained = inference.TrainedModel(model_config, params, tokenizer)
    targets = seq2seq.translate_ids(trained, [list(e["source_ids"]) for e in examples],
                                    max_new_tokens=max_new_tokens, num_beams=num_beams,
                                    batch_size=batch_size, length_penalty=length_penalty)
    hypotheses = [tokenizer.decode(ids).strip() for ids in targets]
    return metrics.bleu(hypotheses, [e["reference"] for e in examples]), hypotheses
  config, params = plain_model(model_config, params)
  trained = inference.TrainedModel(config, params, tokenizer)
  hypotheses = generation.generate_texts(
      trained, [list(e["prompt_ids"]) for e in examples], max_new_tokens=max_new_tokens,
      num_beams=num_beams, batch_size=batch_size, length_penalty=length_penalty)
  hypotheses = [h.strip().split("\n")[0].strip() for h in hypotheses]
  return metrics.bleu(hypotheses, [e["reference"] for e in examples]), hypotheses


@functools.partial(jax.jit, static_argnames=("model",))
def _head_predictions(params, batch, *, model):
  """(predicted class [batch], real-row mask [batch], loss sum, weight sum) in one forward."""
  logits, _ = model.apply({"params": params}, batch["inputs"],
                          last_index=batch["last_index"])  # [batch, labels]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])  # [batch]
  return (jnp.argmax(logits, axis=-1), batch["weights"] > 0,
          (losses * batch["weights"]).sum(), batch["weights"].sum())


@functools.partial(jax.jit, static_argnames=("model",))
def _label_word_predictions(params, batch, label_ids, *, model):
  """The same for label words: the LM head's scores of the label words at answer_index;
  the loss is the LM loss of the label word there (the row's only weighted target)."""
  logits = losses_lib.answer_logits(model, params, batch)  # [batch, vocab]
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits, losses_lib.at_answer(batch, "targets"))  # [batch]
  weights = losses_lib.at_answer(batch, "weights")  # [batch]
  return (jnp.argmax(logits[:, label_ids], axis=-1), weights > 0, (losses * weights).sum(),
          weights.sum())


def classification_predictions(model: Decoder, params, task, batches):
  """(predicted class ids, labels, mean loss) over the real rows of `batches`."""
  predictions, labels = [], []
  total = weight = 0.0
  for batch in batches:
    if task.mode == "head":
      pred, real, t, w = _head_predictions(params, batch, model=model)
    else:
      pred, real, t, w = _label_word_predictions(params, batch,
                                                 np.asarray(task.label_token_ids), model=model)
    real = np.asarray(real)
    predictions.append(np.asarray(pred)[real])
    labels.append(np.asarray(batch["labels"])[real])
    total, weight = total + float(t), weight + float(w)
  return np.concatenate(predictions), np.concatenate(labels), total / max(weight, 1.0)


def evaluate_task(model: Decoder, params, tokenizer, datasets: tasks_lib.TaskDatasets,
                  eval_config, split: str | None = None) -> dict[str, float]:
  """{"bleu"} for generation tasks (translation, sft) or {"loss", "accuracy", "macro_f1"}
  for classification (one forward pass gives all three), on `split` (default: the main
  eval split); nothing for chat (the eval loss measures it)."""
  task = datasets.task
  split = split or datasets.eval_split
  if isinstance(task, tasks_lib.ChatTask):
    return {}  # the loss on the assistant turns is the measure (perplexity: its exp)
  if isinstance(task, tasks_lib.ClassificationTask):
    predictions, labels, loss = classification_predictions(model, params, task,
                                                           datasets.eval_batches(split))
    return {"loss": loss, "accuracy": metrics.accuracy(predictions, labels),
            "macro_f1": metrics.macro_f1(predictions, labels, task.num_labels),
            "examples": float(len(labels))}
  examples = datasets.eval_sets[split].examples
  score, _ = bleu_of(model.config, params, tokenizer, examples,
                     max_new_tokens=eval_config.max_new_tokens, num_beams=eval_config.num_beams,
                     batch_size=eval_config.generation_batch_size,
                     length_penalty=eval_config.length_penalty,
                     limit=eval_config.get("max_generation_examples"))
  limit = eval_config.get("max_generation_examples")
  return {"bleu": score, "examples": float(min(len(examples), limit or len(examples)))}

"""SmolLM2-135M-Instruct fine-tuned for binary sentiment on SST-2.

  python -m decoder_jax.train --config=configs/smollm2_sst2.py:lora --workdir=W \
      --config.task.source=DATA/sst2
  python -m decoder_jax.evaluate --config=configs/smollm2_sst2.py:lora --workdir=W \
      --tsv_file=DATA/sst2/dev.tsv

Arg: the method, `full`, `lora`, `adalora`, `adapter`, `prompt` or `prefix` (sizes and
learning rates: decoder_jax/train/config_sections.py), optionally `,cpu` (`full,cpu` took
24 minutes on 2 idle CPU cores).
By default the LM head scores the label words " negative" / " positive" after the prompt
(task.mode="label_words"); --config.task.mode=head trains a classification head on the
final token instead. task.source defaults to $DECODER_JAX_DATA/sst2 when that variable
is set (DATA above: a folder holding sst2/{train,dev}.tsv), else the tfds catalog's
glue/sst2 (online, with TensorFlow).

Measured, dev accuracy after 300 steps: `lora,cpu` 88.4%, `full,cpu` 88.0% (zero-shot with
the same label words: 79.7%). Other rows: benchmarks/RESULTS.md.
"""

import os

from decoder_jax.data.tasks import default_task_config
from decoder_jax.evaluation.task_eval import default_eval_config
from decoder_jax.train import config_sections as common


def get_config(arg: str | None = None):
  method, cpu = common.parse_finetune_arg(arg)
  task = default_task_config()
  task.kind = "classification"
  data = os.environ.get("DECODER_JAX_DATA")
  task.source = os.path.join(data, "sst2") if data else "glue/sst2"
  task.label_names = ("0", "1")
  task.label_words = (" negative", " positive")
  task.mode = "label_words"
  task.eval_split = "dev"
  task.max_length = 96
  train = common.train_section(
      num_steps=2000, batch_size=32, learning_rate=common.LEARNING_RATES[method],
      min_learning_rate=0.0, warmup_steps=100, weight_decay=0.0, log_every=50,
      eval_every=250, checkpoint_every=500, keep_checkpoints=2)
  evaluation = default_eval_config()
  evaluation.metric = "accuracy"
  if cpu:
    task.max_length = 64
    task.max_train_examples = 8000
    train.update(num_steps=300, batch_size=16, log_every=10, eval_every=150,
                 checkpoint_every=150, warmup_steps=20)
  config = common.finetune_config(method=method, cpu=cpu, task=task, train=train,
                                  eval_section=evaluation)
  config.data.eval_batch_size = 32 if cpu else 64
  return config

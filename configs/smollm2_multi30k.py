"""SmolLM2-135M-Instruct fine-tuned for English->French translation on Multi30k.

  python -m decoder_jax.train --config=configs/smollm2_multi30k.py:lora --workdir=W \
      --config.task.source=DATA/multi30k
  python -m decoder_jax.evaluate --config=configs/smollm2_multi30k.py:lora --workdir=W \
      --split=test_2016_flickr --num_beams=4

Arg: the method, `full`, `lora`, `adalora`, `adapter`, `prompt` or `prefix` (sizes:
decoder_jax/train/config_sections.py), optionally `,cpu` (a recipe for 2 CPU cores: a slice of the
training data, a shorter schedule, BLEU on part of val during training; `full,cpu` took
33 minutes on 2 idle cores). The model is decoder-only: the English sentence goes in the prompt and
the French one is the response (loss on the response only). task.source defaults to
$DECODER_JAX_DATA/multi30k when that variable is set (DATA above: a folder holding
multi30k/{train,val,test_2016_flickr}.{en,fr}[.gz]), else the tfds catalog's
wmt14_translate/fr-en (online, with TensorFlow).

Measured on test_2016_flickr, greedy: `lora,cpu` BLEU 22.1, `full,cpu` 18.4 (zero-shot
with the same prompt: 0.3). Other rows: benchmarks/RESULTS.md.
"""

import os

from decoder_jax.data.tasks import default_task_config
from decoder_jax.evaluation.task_eval import default_eval_config
from decoder_jax.train import config_sections as common


# Translation learns more than two label words: LoRA and AdaLoRA take twice SST-2's rate.
LEARNING_RATES = {**common.LEARNING_RATES, "full": 5e-5, "lora": 1e-3, "adalora": 2e-3}


def get_config(arg: str | None = None):
  method, cpu = common.parse_finetune_arg(arg)
  task = default_task_config()
  task.kind = "translation"
  data = os.environ.get("DECODER_JAX_DATA")
  task.source = os.path.join(data, "multi30k") if data else "wmt14_translate/fr-en"
  task.src_lang, task.tgt_lang = "en", "fr"
  task.eval_split = "val"
  task.max_length = 128
  train = common.train_section(
      num_steps=3000, batch_size=32, learning_rate=LEARNING_RATES[method],
      min_learning_rate=0.0, warmup_steps=100, weight_decay=0.0, log_every=50,
      eval_every=500, checkpoint_every=500, keep_checkpoints=2)
  evaluation = default_eval_config()
  evaluation.metric = "bleu"
  evaluation.max_new_tokens = 64
  evaluation.generation_batch_size = 64
  if cpu:
    task.max_length = 64
    # Prompt + response is 46 tokens at the median (SmolLM2 tokenizer): a 48 bucket pads
    # an example to 53 tokens on average instead of 62.
    task.buckets = (16, 32, 48, 64)
    task.max_train_examples = 4000
    task.max_eval_examples = 200
    train.update(num_steps=250, batch_size=16, log_every=10, eval_every=125,
                 checkpoint_every=125, warmup_steps=20)
    evaluation.update(max_new_tokens=40, generation_batch_size=50)
  config = common.finetune_config(method=method, cpu=cpu, task=task, train=train,
                                  eval_section=evaluation)
  config.data.eval_batch_size = 32 if cpu else 64
  return config

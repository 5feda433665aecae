"""SmolLM2-135M-Instruct fine-tuned as a conversation partner on real two-person chats.

  pip install chitchat-dataset        # the corpus (MIT licence), or: pip install -e '.[chat]'
  python -m decoder_jax.train --config=configs/smollm2_chat.py:lora,cpu --workdir=W
  python -m decoder_jax.evaluate --config=configs/smollm2_chat.py:lora,cpu --workdir=W \
      --split=test
  python -m decoder_jax.generate --workdir=W --chat --temperature=0.7 --max_new_tokens=60

Arg: the method (`full`, `lora`, `adalora`, `adapter`, `prompt`, `prefix`), optionally
`,cpu`. The data is the Chit Chat Challenge corpus (decoder_jax/data/chat_corpora.py):
people chatting in pairs about a prompt, cut into windows of 6 turns, split 90/5/5 by
conversation. task.source may instead name a directory of {train,val,test}.jsonl files
of {"messages": [{"role", "content"}, ...]} objects (any chat data in that common
format). Each conversation is rendered with the model's chat template; the loss is on
the assistant turns only. `evaluate` reports the perplexity of the held-out assistant
turns and a few greedy replies beside the people's; `generate --chat` without --prompt
talks to the model turn by turn on stdin.

Measured (`lora,cpu`, 2 cores, 2026-12-03): val perplexity of the assistant turns 37.4
at step 125 and 36.1 at step 250; 2,084 s of training with the cores partly shared (about
25 minutes alone). Details: benchmarks/RESULTS.md.
"""

from decoder_jax.data import chat_corpora
from decoder_jax.data.tasks import default_task_config
from decoder_jax.evaluation.task_eval import default_eval_config
from decoder_jax.train import config_sections as common


def get_config(arg: str | None = None):
  method, cpu = common.parse_finetune_arg(arg)
  task = default_task_config()
  task.kind = "chat"
  task.source = chat_corpora.CHITCHAT
  task.eval_split = "val"
  task.max_length = 256
  train = common.train_section(
      num_steps=2000, batch_size=16, learning_rate=common.LEARNING_RATES[method],
      min_learning_rate=0.0, warmup_steps=100, weight_decay=0.0, log_every=50,
      eval_every=500, checkpoint_every=500, keep_checkpoints=2)
  evaluation = default_eval_config()
  evaluation.metric = "loss"
  evaluation.max_new_tokens = 48
  if cpu:
    # 2-core recipe: conversations cut at 128 tokens (about two exchanges after the
    # template's system line), 250 steps of 8.
    task.max_length = 128
    task.buckets = (64, 96, 128)
    task.max_train_examples = 4000
    task.max_eval_examples = 256
    train.update(num_steps=250, batch_size=8, log_every=10, eval_every=125,
                 checkpoint_every=125, warmup_steps=20)
  config = common.finetune_config(method=method, cpu=cpu, task=task, train=train,
                                  eval_section=evaluation)
  config.data.eval_batch_size = 32
  return config

"""A Transformer encoder-decoder trained from scratch for English->French on Multi30k.

  python -m decoder_jax.train --config=configs/multi30k_seq2seq.py:cpu --workdir=W \
      --config.task.source=DATA/multi30k

Args (comma-separated, any order):
  * `cpu`: a recipe for 2 CPU cores (measured below); without it, the GPU recipe, a
    Transformer-base-like model (6 + 6 layers, width 512, 8 heads, MLP 2048, batch 128
    sentence pairs, 25k steps, bfloat16 compute; not yet measured).
  * `decoder_only`: the baseline with the same data, vocabulary, steps and optimizer and
    about as many parameters (counts below): a decoder-only model reading
    source + eos, then writing target + eos (task.kind "seq2seq" in its decoder-only
    layout, decoder_jax/data/tasks.py).

The vocabulary is a joint SentencePiece BPE of 8000 pieces trained on the train split's
English and French sentences together on the run's first start (about 0.4 s; saved in the
workdir). task.source defaults to $DECODER_JAX_DATA/multi30k when that variable is set
(a folder holding multi30k/{train,val,test_2016_flickr}.{en,fr}[.gz]); otherwise set it
as above.
Sentences are short: with this vocabulary, source + eos on the train split is at most 48
tokens (99th percentile 29) and target + eos at most 59 (99th percentile 34; test_2016_flickr:
31 and 36), so task.max_length=64 keeps every pair.

Training as in Vaswani et al. (2017): label smoothing 0.1, dropout 0.1, Adam(0.9, 0.98),
the inverse-square-root schedule after a linear warmup; the embeddings are shared by the
encoder, the decoder and the output layer (tie_embeddings). eval.metric is BLEU on val
(greedy during training); test_2016_flickr:

  python -m decoder_jax.evaluate --config=configs/multi30k_seq2seq.py:cpu --workdir=W \
      --split=test_2016_flickr

Measured (`cpu`, 2 idle AMD EPYC cores, 2026-12-04; benchmarks/RESULTS.md): the 4500 steps
take 28.6 minutes (360 ms/step, compiles and three val BLEU evaluations included); val BLEU
(first 300, greedy) 39.5, 50.4 and 52.3 at steps 1500, 3000 and 4500; test_2016_flickr
50.8 greedy, 53.0 with --num_beams=4. The decoder-only baseline: benchmarks/RESULTS.md.
7.611M parameters (decoder_only: 7.610M); the GPU recipe 48.30M (decoder_only: 48.30M).
"""

import os

from decoder_jax.data.tasks import default_task_config
from decoder_jax.errors import ConfigError
from decoder_jax.evaluation.task_eval import default_eval_config
from decoder_jax.train import config_sections as common

ARGS = ("cpu", "decoder_only")
VOCAB_SIZE = 8000
# Decoder-only layers with the encoder-decoder's parameter count: an encoder block holds
# attention + MLP (4 w^2 + 2 w mlp), a decoder block adds cross-attention (4 w^2), so
# E + D blocks weigh about as much as E + D + D * 4 w^2 / (4 w^2 + 2 w mlp) = E + 4D/3
# decoder-only blocks at mlp = 4 w (3 + 3 -> 7, 6 + 6 -> 14).
SIZES = {
    # (width, heads, mlp, encoder layers, decoder layers, decoder-only layers)
    True: (256, 4, 1024, 3, 3, 7),
    False: (512, 8, 2048, 6, 6, 14),
}


def parse_arg(arg: str | None) -> tuple[bool, bool]:
  """"cpu,decoder_only" -> (cpu, decoder_only)."""
  parts = [p for p in (arg or "").split(",") if p]
  if any(p not in ARGS for p in parts) or len(parts) != len(set(parts)):
    raise ConfigError(f"config arg {arg!r}: give any of {', '.join(ARGS)}, comma-separated "
                      "(e.g. ':cpu' or ':cpu,decoder_only')")
  return "cpu" in parts, "decoder_only" in parts


def get_config(arg: str | None = None):
  cpu, decoder_only = parse_arg(arg)
  width, heads, mlp, encoder_layers, decoder_layers, single_layers = SIZES[cpu]
  task = default_task_config()
  task.kind = "seq2seq"
  data = os.environ.get("DECODER_JAX_DATA")
  task.source = os.path.join(data, "multi30k") if data else None
  task.src_lang, task.tgt_lang = "en", "fr"
  task.eval_split = "val"
  task.vocab_size = VOCAB_SIZE
  task.spm_model_type = "bpe"
  if decoder_only:
    # Source + eos + target + eos in one sequence: 30 tokens at the median, 104 at most.
    task.max_length = 128
    task.buckets = (32, 48, 64, 96, 128)
  else:
    # The longer side + 1: 17 tokens at the median, 59 at most; a 64-pair batch is 16
    # tokens wide half the time, 24 a third of it (71% of the padded tokens are real).
    task.max_length = 64
    task.buckets = (16, 24, 32, 48, 64)
  model = common.model_section(
      family="gpt2", width=width, num_heads=heads, mlp_width=mlp,
      num_layers=single_layers if decoder_only else decoder_layers,
      encoder_layers=0 if decoder_only else encoder_layers,
      max_length=task.max_length, dropout=0.1, tie_embeddings=True,
      dtype="float32" if cpu else "bfloat16",
      attention_impl="einsum" if cpu else "auto")
  train = common.train_section(
      num_steps=25_000, batch_size=128, schedule="inverse_sqrt", learning_rate=7e-4,
      warmup_steps=4000, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.0, grad_clip=1.0,
      label_smoothing=0.1, log_every=100, eval_every=2500, checkpoint_every=2500,
      keep_checkpoints=2)
  evaluation = default_eval_config()
  evaluation.metric = "bleu"
  evaluation.num_beams = 1
  evaluation.max_new_tokens = 60  # The longest target is 58 tokens.
  evaluation.generation_batch_size = 128
  if cpu:
    train.update(num_steps=4500, batch_size=64, learning_rate=2e-3, warmup_steps=1000,
                 log_every=50, eval_every=1500, checkpoint_every=1500,
                 flat_grad_allreduce=True)
    evaluation.max_generation_examples = 300  # Of val's 1014, to keep evaluations short.
  config = common.base_config(model=model, train=train, seed=0,
                              mesh=dict(num_cpu_devices=2) if cpu else None)
  config.task = task
  config.eval = evaluation
  config.data.eval_batch_size = 64 if cpu else 128
  return config

"""The seq2seq task and what trains it from scratch: the joint vocabulary, batches for an
encoder-decoder and for a decoder-only model, label smoothing, the inverse-square-root
schedule, and a tiny encoder-decoder run through the loop that checkpoints and resumes.

All on a tiny word-for-word "English -> French" corpus written to tmp_path."""

import gzip
import json
import os
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import pytest

from conftest import REPO
from decoder_jax import losses
from decoder_jax.data import tasks, tokenizers
from decoder_jax.errors import ConfigError
from decoder_jax.model import Decoder, ModelConfig, init_inputs
from decoder_jax.model.encoder_decoder import EncoderDecoder
from decoder_jax.train import loop, optimizer, setup

WORDS = {"the": "le", "red": "rouge", "cat": "chat", "dog": "chien", "sees": "voit",
         "eats": "mange", "a": "un", "big": "grand", "small": "petit", "bird": "oiseau",
         "runs": "court", "and": "et", "house": "maison", "near": "pres"}
VOCAB = 48
BUCKETS = (8, 16, 24, 32)


def _sentences(seed, count):
  rng = np.random.default_rng(seed)
  words = sorted(WORDS)
  en = [" ".join(rng.choice(words, size=rng.integers(1, 9))) for _ in range(count)]
  return en, [" ".join(WORDS[w] for w in s.split()) for s in en]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """DIR/{train,val}.{en,fr}.gz: 96 and 20 pairs."""
  folder = tmp_path_factory.mktemp("parallel")
  for split, seed, count in (("train", 0, 96), ("val", 1, 20)):
    for lang, lines in zip(("en", "fr"), _sentences(seed, count)):
      (folder / f"{split}.{lang}.gz").write_bytes(
          gzip.compress("".join(line + "\n" for line in lines).encode()))
  return folder


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def task_config(corpus, tfds_dir, **fields):
  config = tasks.default_task_config()
  config.update({**dict(kind="seq2seq", source=str(corpus), eval_split="val",
                        vocab_size=VOCAB, max_length=32, buckets=BUCKETS,
                        tfds_data_dir=tfds_dir), **fields})
  return config


@pytest.fixture(scope="module")
def vocab(corpus, tfds_dir):
  return tasks.train_vocabulary(task_config(corpus, tfds_dir))


def test_joint_vocabulary_is_deterministic_with_its_own_specials(corpus, tfds_dir, vocab):
  before = sorted(os.listdir(corpus))
  again = tasks.train_vocabulary(task_config(corpus, tfds_dir))
  assert again.model_proto == vocab.model_proto  # the same data gives the same vocabulary
  assert sorted(os.listdir(corpus)) == before  # trained in memory: nothing written
  assert vocab.vocab_size == VOCAB
  specials = {vocab.processor.unk_id(), vocab.bos_id, vocab.eos_id, vocab.pad_id}
  assert vocab.pad_id is not None and len(specials) == 4
  # Both languages' words are pieces of the one vocabulary, the same at a sentence's
  # start as inside it (the dummy prefix).
  for word in ("chat", "maison", "cat", "house"):
    assert vocab.encode(f"le {word}")[1:] == vocab.encode(word), word
  real = vocab.encode(" ".join(list(WORDS) + list(WORDS.values())))
  assert not specials & set(real)
  unigram = tasks.train_vocabulary(task_config(corpus, tfds_dir, spm_model_type="unigram"))
  assert unigram.model_proto != vocab.model_proto
  with pytest.raises(ConfigError, match="task.spm_model_type"):
    tasks.train_vocabulary(task_config(corpus, tfds_dir, spm_model_type="word"))
  with pytest.raises(ConfigError, match="task.vocab_size is not set"):
    tasks.train_vocabulary(task_config(corpus, tfds_dir, vocab_size=None))
  with pytest.raises(ConfigError, match="no prompt"):
    tasks.make_task(task_config(corpus, tfds_dir, prompt_template="{source}"), vocab)
  with pytest.raises(ConfigError, match="task.vocab_size"):
    tasks.make_task(task_config(corpus, tfds_dir, kind="translation"), vocab)


def datasets(corpus, tfds_dir, vocab, encoder_decoder, batch=8, eval_batch=16, **fields):
  return tasks.make_task_datasets(task_config(corpus, tfds_dir, **fields), vocab,
                                  global_batch_size=batch, eval_batch_size=eval_batch, seed=0,
                                  process_index=0, process_count=1,
                                  encoder_decoder=encoder_decoder)


def _pairs(corpus, split):
  return [gzip.decompress((corpus / f"{split}.{lang}.gz").read_bytes()).decode().splitlines()
          for lang in ("en", "fr")]


def test_encoder_decoder_batches_align_source_inputs_targets(corpus, tfds_dir, vocab):
  data = datasets(corpus, tfds_dir, vocab, True)
  bos, eos, pad = vocab.bos_id, vocab.eos_id, vocab.pad_id
  assert data.pad_id == pad
  en, fr = _pairs(corpus, "train")
  target_of = {tuple(vocab.encode(s) + [eos]): vocab.encode(t) for s, t in zip(en, fr)}
  for _ in range(4):
    batch = next(data.train_iter)
    assert set(batch) == {"source", "source_lengths", "inputs", "targets", "weights"}
    rows, length = batch["inputs"].shape
    assert batch["source"].shape == (rows, length) and rows == 8
    longest = 0
    for row in range(rows):
      n = int(batch["source_lengths"][row])
      source = list(batch["source"][row, :n])
      assert source[-1] == eos and all(batch["source"][row, n:] == pad)
      target = target_of[tuple(source)]
      m = len(target) + 1
      assert list(batch["inputs"][row, :m]) == [bos] + target
      assert list(batch["targets"][row, :m]) == target + [eos]
      assert all(batch["inputs"][row, m:] == pad) and all(batch["targets"][row, m:] == pad)
      np.testing.assert_array_equal(batch["weights"][row], np.arange(length) < m)
      longest = max(longest, n, m)
    # One bucket for both sides: the smallest that holds the longer one.
    assert length == min(b for b in BUCKETS if b >= longest)
    assert batch["source"].dtype == batch["source_lengths"].dtype == np.int32
    assert batch["weights"].dtype == np.float32

  # Eval: every example once; padding rows have source length 1 and no weight.
  eval_batches = list(data.eval_batches())
  weights = np.concatenate([b["weights"].sum(1) for b in eval_batches])
  assert (weights > 0).sum() == 20 and len(weights) == 32
  last = eval_batches[-1]
  pad_rows = last["weights"].sum(1) == 0
  assert pad_rows.sum() == 12 and all(last["source_lengths"][pad_rows] == 1)
  assert all(last["source"][pad_rows].ravel() == pad)
  val_en, val_fr = _pairs(corpus, "val")
  example = data.eval_examples[0]
  assert set(example) == {"source_ids", "reference", "source"}
  assert example["source"] == val_en[0] and example["reference"] == val_fr[0]
  assert list(example["source_ids"]) == vocab.encode(val_en[0]) + [eos]
  assert example["source_ids"].dtype == np.int32


def test_long_sources_are_cut_and_long_targets_dropped(vocab):
  config = tasks.default_task_config()
  config.kind = "seq2seq"
  task = tasks.make_task(config, vocab, encoder_decoder=True)
  long = " ".join(["cat"] * 20)
  encoded = tasks.encode_examples(task, [{"source": long, "target": "chat"},
                                         {"source": "cat", "target": " ".join(["chat"] * 20)}],
                                  max_length=8)
  assert encoded.stats == {"examples": 2, "kept": 1, "truncated": 1, "dropped": 1}
  assert len(encoded.sources[0]) == 8 and encoded.sources[0][-1] == vocab.eos_id
  assert list(encoded.lengths) == [8]


def test_decoder_only_batches_read_source_eos_then_target(corpus, tfds_dir, vocab):
  data = datasets(corpus, tfds_dir, vocab, False, buckets=(16, 32, 64), max_length=64)
  eos = vocab.eos_id
  en, fr = _pairs(corpus, "train")
  sequences = {tuple(vocab.encode(s) + [eos] + vocab.encode(t) + [eos]): len(vocab.encode(s)) + 1
               for s, t in zip(en, fr)}
  batch = next(data.train_iter)
  assert set(batch) == {"inputs", "targets", "weights"}
  for row in range(batch["inputs"].shape[0]):
    n = int((batch["targets"][row] != vocab.pad_id).sum())
    seq = [int(batch["inputs"][row, 0])] + list(batch["targets"][row, :n])
    prompt = sequences[tuple(seq)]  # source + eos, then target + eos
    np.testing.assert_array_equal(batch["weights"][row],
                                  (np.arange(batch["inputs"].shape[1]) >= prompt - 1)
                                  & (np.arange(batch["inputs"].shape[1]) < n))
  val_en, val_fr = _pairs(corpus, "val")
  example = data.eval_examples[0]
  assert set(example) == {"prompt_ids", "reference", "source"}
  assert list(example["prompt_ids"]) == vocab.encode(val_en[0]) + [eos]
  assert example["reference"] == val_fr[0]


# ----------------------------------------------------------------------------- losses

TINY = dict(family="gpt2", vocab_size=VOCAB, num_layers=1, num_heads=2, width=16,
            max_length=16, mlp_width=32)


def _batch(rng):
  source = rng.integers(4, VOCAB, (3, 10)).astype(np.int32)
  tokens = rng.integers(4, VOCAB, (3, 11)).astype(np.int32)
  weights = np.ones((3, 10), np.float32)
  weights[1, 6:] = 0.0
  return {"source": source, "source_lengths": np.array([10, 7, 3], np.int32),
          "inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}


# Both paths of the encoder-decoder; the decoder-only plain path is shared with it.
@pytest.mark.parametrize("encoder_decoder,chunk_size", [(True, None), (True, 7), (False, 7)])
def test_label_smoothing_matches_the_formula(encoder_decoder, chunk_size):
  config = ModelConfig(**TINY, encoder_layers=1 if encoder_decoder else 0)
  batch = _batch(np.random.default_rng(0))
  if not encoder_decoder:
    batch = {k: batch[k] for k in ("inputs", "targets", "weights")}
  model = EncoderDecoder(config) if encoder_decoder else Decoder(config)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), *init_inputs(config))["params"])
  epsilons = (0.0, 0.1, 0.3)

  @jax.jit  # one program: op by op, each operation would compile on its own
  def outputs(p, b):
    logits, _ = losses.apply_model(model, p, b)  # [3, 10, vocab]
    plain = optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"])  # [3, 10]
    return logits, (plain * b["weights"]).sum(), [
        losses.loss_sums(model, p, b, chunk_size=chunk_size, label_smoothing=eps)
        for eps in epsilons]

  logits, plain_sum, sums = outputs(params, batch)
  log_p = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)))  # [3, 10, vocab]
  nll = -np.take_along_axis(log_p, batch["targets"][..., None], -1)[..., 0]  # [3, 10]
  w = batch["weights"]
  for eps, (total, weight) in zip(epsilons, sums):
    expected = ((1 - eps) * nll + eps * -log_p.mean(-1)) * w
    np.testing.assert_allclose(float(total), expected.sum(), rtol=1e-5)
    assert float(weight) == w.sum()
  # eps = 0 is the plain cross-entropy (the eval loss's).
  np.testing.assert_allclose(float(sums[0][0]), float(plain_sum), rtol=1e-6)


# ----------------------------------------------------------------------------- schedule


def test_inverse_sqrt_schedule_and_a_bad_name():
  train = ml_collections.ConfigDict(dict(schedule="inverse_sqrt", learning_rate=1e-3,
                                         warmup_steps=100, num_steps=1000,
                                         min_learning_rate=0.0))
  lr = optimizer.learning_rate_schedule(train)
  # Update number step = count + 1: linear to the peak at step 100, then sqrt(100 / step).
  for count, expected in ((0, 1e-5), (49, 5e-4), (99, 1e-3), (399, 5e-4), (9999, 1e-4)):
    np.testing.assert_allclose(float(lr(count)), expected, rtol=1e-6)
  train.schedule = "cosine"
  assert float(optimizer.learning_rate_schedule(train)(100)) == pytest.approx(1e-3)
  train.schedule = "linear"
  with pytest.raises(ConfigError, match="train.schedule must be one of cosine, inverse_sqrt"):
    optimizer.learning_rate_schedule(train)
  train.schedule, train.label_smoothing = "cosine", 1.0
  with pytest.raises(ConfigError, match="label_smoothing"):
    setup.check_train_choices(train)


# ----------------------------------------------------------------------------- end to end


def run_config(corpus, tfds_dir, monkeypatch):
  sys.path.insert(0, str(REPO))
  from configs import multi30k_seq2seq
  config = multi30k_seq2seq.get_config("cpu")
  # One bucket: one shape of the train and eval steps to compile.
  config.task.update(dict(source=str(corpus), vocab_size=VOCAB, max_length=32,
                          buckets=(32,), tfds_data_dir=tfds_dir))
  config.model.update(dict(width=16, num_heads=2, mlp_width=32, num_layers=1,
                           encoder_layers=1, max_length=32))
  config.train.update(dict(num_steps=3, batch_size=8, log_every=1, eval_every=2,
                           checkpoint_every=2, warmup_steps=2, flat_grad_allreduce=False))
  config.eval.metric = "loss"
  config.data.eval_batch_size = 8
  config.mesh.num_cpu_devices = None
  config.compilation_cache_dir = ""
  # The loop's loss only: decoding for BLEU (tests/test_encoder_decoder.py) would compile
  # a decode loop here too.
  from decoder_jax.evaluation import task_eval
  monkeypatch.setattr(task_eval, "evaluate_task", lambda *args, **kw: {})
  return config


def test_encoder_decoder_trains_from_scratch_checkpoints_and_resumes(corpus, tfds_dir, tmp_path,
                                                                     monkeypatch):
  config = run_config(corpus, tfds_dir, monkeypatch)
  workdir = str(tmp_path / "w")
  devices = jax.devices()[:1]

  # A bad config leaves the new workdir uncreated, the vocabulary trained or not.
  for field, value in (("train.schedule", "linear"), ("model.num_heads", 3)):
    bad = config.copy_and_resolve_references()
    section, name = field.split(".")
    bad[section][name] = value
    with pytest.raises(ConfigError):
      loop.train_and_evaluate(bad, workdir, devices=devices)
    assert not os.path.exists(workdir), field

  config.train.stop_at_step = 2
  first = loop.train_and_evaluate(config, workdir, devices=devices)
  assert np.isfinite(first["eval/loss"]) and np.isfinite(first["train/loss"])
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  with open(os.path.join(workdir, "model_config.json")) as f:
    saved = json.load(f)
  assert saved["encoder_layers"] == 1 and saved["vocab_size"] == VOCAB
  vocab = tokenizers.load_tokenizer(workdir)

  # Resuming reads the vocabulary back (a changed corpus would not retrain it) and goes on.
  config.train.stop_at_step = None
  config.task.vocab_size = VOCAB + 1  # unused on resume: the workdir's vocabulary holds
  resumed = loop.train_and_evaluate(config, workdir, devices=devices)
  assert "3" in os.listdir(os.path.join(workdir, "checkpoints"))
  assert tokenizers.load_tokenizer(workdir).model_proto == vocab.model_proto
  steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert steps[-1] == 3 and np.isfinite(resumed["eval/loss"])

  # evaluate's library call on line-aligned files, as `python -m decoder_jax.evaluate
  # --source_file --reference_file` runs it: the run's data need not be there (a source
  # that does not exist), and an unset task.source is the run's own, from its workdir.
  from decoder_jax.evaluation import finetuned
  config.task.source = None
  assert finetuned.with_run_source(config, workdir).task.source == str(corpus)
  config.task.source = str(tmp_path / "not_here")
  config.eval.max_new_tokens = 8
  en, fr = _sentences(7, 5)
  (tmp_path / "test.en").write_text("\n".join(en) + "\n")
  (tmp_path / "test.fr").write_text("\n".join(fr) + "\n")
  result = finetuned.evaluate(config, workdir, weights="latest",
                              source_file=str(tmp_path / "test.en"),
                              reference_file=str(tmp_path / "test.fr"), num_beams=2,
                              output=str(tmp_path / "out.jsonl"))
  assert result["examples"] == 5 and 0.0 <= result["bleu"] <= 100.0
  assert result["weights"] == "latest checkpoint, step 3"
  assert result["decoding"]["num_beams"] == 2
  written = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
  assert [w["source"] for w in written] == en and [w["reference"] for w in written] == fr

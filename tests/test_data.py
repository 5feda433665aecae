"""Tests for decoder_jax.data: tokenizers, tfds text corpora and grain batch pipelines."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from decoder_jax.data import pipeline, text_corpus
from decoder_jax.data.tokenizers import (
    CharTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    save_tokenizer,
)

DATA = text_corpus.BUNDLED_DIR  # laid out like ../shared/data: tiny_shakespeare/input.txt
SHAKESPEARE = DATA / "tiny_shakespeare" / "input.txt"

SEQ_LEN, BATCH = 64, 12


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  # One prepared copy per module: preparing is what the first test pays for.
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def shakespeare_text():
  return SHAKESPEARE.read_text(encoding="utf-8")


def _config(tfds_dir, **overrides):
  config = pipeline.default_data_config()
  config.local_dir = str(DATA)
  config.tfds_data_dir = tfds_dir
  config.update(overrides)
  return config


def _make(config, *, seq_len=SEQ_LEN, batch=BATCH, seed=1337, index=0, count=1):
  return pipeline.make_datasets(config, seq_len=seq_len, global_batch_size=batch, seed=seed,
                                process_index=index, process_count=count)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def _write_documents(folder: Path, count: int, alphabet: str, seed: int = 0) -> list[str]:
  """`count` small documents of words over `alphabet`, named doc_00.txt, doc_01.txt..."""
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  texts = []
  for i in range(count):
    words = ["".join(rng.choice(list(alphabet), size=rng.integers(2, 7)))
             for _ in range(rng.integers(20, 60))]
    text = " ".join(words) + "\n"
    (folder / f"doc_{i:02d}.txt").write_text(text, encoding="utf-8")
    texts.append(text)
  return texts


# --- tokenizers -------------------------------------------------------------------------


def test_char_tokenizer_vocab_and_round_trip(shakespeare_text):
  tokenizer = CharTokenizer.from_text(shakespeare_text)
  assert tokenizer.vocab_size == 65
  assert tokenizer.eos_id is None
  ids = tokenizer.encode(shakespeare_text)
  assert isinstance(ids, list) and len(ids) == len(shakespeare_text)
  assert min(ids) == 0 and max(ids) == 64
  assert tokenizer.decode(ids) == shakespeare_text
  # nanoGPT's ids: index in the sorted character set.
  assert tokenizer.encode("\n !A") == [0, 1, 2, 13]
  with pytest.raises(ValueError, match="2 character.*'ß', 'é'"):
    tokenizer.encode("Straße, café")


def test_char_tokenizer_save_load(tmp_path):
  tokenizer = CharTokenizer.from_text("hello world\n")
  save_tokenizer(tokenizer, tmp_path / "workdir")
  reloaded = load_tokenizer(tmp_path / "workdir")
  assert isinstance(reloaded, CharTokenizer)
  assert reloaded.chars == tokenizer.chars
  assert reloaded.encode("hello") == tokenizer.encode("hello")
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    load_tokenizer(tmp_path / "elsewhere")


def test_sentencepiece_train_load_round_trip(tmp_path, shakespeare_text):
  corpus = tmp_path / "small.txt"
  corpus.write_text(shakespeare_text[:50_000], encoding="utf-8")
  trained = SentencePieceTokenizer.train(corpus, tmp_path / "spm" / "small", vocab_size=120)
  assert trained.vocab_size == 120
  loaded = SentencePieceTokenizer.load(tmp_path / "spm" / "small.model")
  text = shakespeare_text[50_000:52_000]  # Unseen text, same character set.
  ids = loaded.encode(text)
  assert ids == trained.encode(text)
  assert len(ids) < len(text)  # Pieces longer than one character were learned.
  assert loaded.decode(ids) == text  # Exact, newlines and repeated spaces included.
  assert loaded.eos_id == 2 and loaded.bos_id == 1
  save_tokenizer(loaded, tmp_path / "workdir")
  reloaded = load_tokenizer(tmp_path / "workdir")
  assert isinstance(reloaded, SentencePieceTokenizer)
  assert reloaded.encode(text) == ids


# --- corpus splits ----------------------------------------------------------------------


def test_split_matches_nanogpt(tfds_dir, shakespeare_text):
  corpus = text_corpus.load_local_corpus(SHAKESPEARE.parent, val_fraction=0.1,
                                         data_dir=tfds_dir)
  n = len(shakespeare_text)
  assert corpus.single_text
  assert corpus.train == [shakespeare_text[: int(n * 0.9)]]
  assert corpus.validation == [shakespeare_text[int(n * 0.9):]]


def test_prepared_copy_is_reused_and_refreshed_on_change(tmp_path, monkeypatch):
  path = tmp_path / "story.txt"
  path.write_text("once upon a time " * 100, encoding="utf-8")
  first = text_corpus.load_local_corpus(path, val_fraction=0.1, data_dir=str(tmp_path / "t"))

  def fail(*args, **kwargs):
    raise AssertionError("the prepared copy should have been reused")

  with monkeypatch.context() as patch:
    patch.setattr(text_corpus, "split_documents", fail)
    again = text_corpus.load_local_corpus(path, val_fraction=0.1,
                                          data_dir=str(tmp_path / "t"))
  assert again.train == first.train and again.cache_dir == first.cache_dir

  path.write_text("a different story " * 120, encoding="utf-8")
  changed = text_corpus.load_local_corpus(path, val_fraction=0.1,
                                          data_dir=str(tmp_path / "t"))
  assert changed.cache_dir != first.cache_dir
  assert changed.train[0].startswith("a different story")


# Loads argv[1] into the tfds dir argv[2] as soon as the file argv[3] exists, so that two
# processes start preparing the same new corpus at the same moment.
_LOAD_AT_ONCE = """
import os, sys, time
from decoder_jax.data import text_corpus
while not os.path.exists(sys.argv[3]):
  time.sleep(0.01)
corpus = text_corpus.load_local_corpus(sys.argv[1], val_fraction=0.1, data_dir=sys.argv[2])
print(len("".join(corpus.train)), len("".join(corpus.validation)))
"""


def test_two_processes_prepare_the_same_corpus_at_once(tmp_path):
  import subprocess
  import sys
  import time
  path = tmp_path / "story.txt"
  path.write_text("once upon a time " * 2000, encoding="utf-8")
  go = tmp_path / "go"
  procs = [subprocess.Popen([sys.executable, "-c", _LOAD_AT_ONCE, str(path),
                             str(tmp_path / "t"), str(go)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  time.sleep(4)  # both have imported tfds and wait
  go.touch()
  outputs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-2000:]
  # tfds prints its own progress first; the last line is ours: both read the same splits.
  assert [out.splitlines()[-1] for out, _ in outputs] == ["30600 3400"] * 2


# --- windows layout ---------------------------------------------------------------------


def test_windows_are_shifted_pairs_inside_their_split(tfds_dir, shakespeare_text):
  data = _make(_config(tfds_dir))
  assert data.layout == "windows" and data.tokenizer.vocab_size == 65
  cut = int(len(shakespeare_text) * 0.9)
  train_text, val_text = shakespeare_text[:cut], shakespeare_text[cut:]
  for batch in _take(data.train_iter, 5):
    assert batch["inputs"].shape == batch["targets"].shape == (BATCH, SEQ_LEN)
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    for inputs, targets in zip(batch["inputs"], batch["targets"]):
      window = data.tokenizer.decode(np.append(inputs, targets[-1]))
      assert window in train_text
  eval_batch = next(data.eval_batches())
  for inputs, targets in zip(eval_batch["inputs"], eval_batch["targets"]):
    assert data.tokenizer.decode(np.append(inputs, targets[-1])) in val_text


def test_same_seed_same_batches(tfds_dir):
  first = _take(_make(_config(tfds_dir), seed=7).train_iter, 4)
  second = _take(_make(_config(tfds_dir), seed=7).train_iter, 4)
  other = _take(_make(_config(tfds_dir), seed=8).train_iter, 4)
  _assert_same_batches(first, second)
  assert not np.array_equal(first[0]["inputs"], other[0]["inputs"])
  assert not np.array_equal(first[0]["inputs"], first[1]["inputs"])


def test_resume_from_state_gives_identical_batches(tfds_dir):
  uninterrupted = _make(_config(tfds_dir)).train_iter
  expected = _take(uninterrupted, 8)[3:]

  interrupted = _make(_config(tfds_dir)).train_iter
  _take(interrupted, 3)
  state = json.loads(json.dumps(interrupted.get_state()))  # As a checkpoint stores it.
  resumed = _make(_config(tfds_dir)).train_iter
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 5), expected)


def test_processes_split_the_global_batch(tfds_dir):
  config = _config(tfds_dir, num_eval_windows=20, eval_batch_size=8)
  whole = _make(config, count=1)
  halves = [_make(config, index=p, count=2) for p in range(2)]
  batches = [_take(d.train_iter, 3) for d in halves]
  for step, global_batch in enumerate(_take(whole.train_iter, 3)):
    for key in ("inputs", "targets"):
      assert batches[0][step][key].shape == (BATCH // 2, SEQ_LEN)
      np.testing.assert_array_equal(
          np.concatenate([batches[0][step][key], batches[1][step][key]]), global_batch[key])
  evals = [list(d.eval_batches()) for d in halves]
  for step, global_batch in enumerate(whole.eval_batches()):
    for key in ("inputs", "targets", "weights"):
      np.testing.assert_array_equal(
          np.concatenate([evals[0][step][key], evals[1][step][key]]), global_batch[key])


def test_eval_batches_are_fixed_and_padding_has_zero_weight(tfds_dir):
  config = _config(tfds_dir, num_eval_windows=10, eval_batch_size=4)
  data = _make(config, seed=1)
  first, second = list(data.eval_batches()), list(data.eval_batches())
  _assert_same_batches(first, second)
  _assert_same_batches(first, list(_make(config, seed=2).eval_batches()))  # Seed-independent.
  assert len(first) == 3
  for batch in first:
    assert batch["inputs"].shape == batch["weights"].shape == (4, SEQ_LEN)
    assert batch["weights"].dtype == np.float32
  assert first[0]["weights"].min() == 1.0
  np.testing.assert_array_equal(first[-1]["weights"][:, 0], [1.0, 1.0, 0.0, 0.0])
  assert sum(b["weights"][:, 0].sum() for b in first) == 10
  with pytest.raises(ValueError):
    first[0]["inputs"][0, 0] = 1  # Read-only, so no caller can change later calls.


# --- packed layout ----------------------------------------------------------------------


def test_packed_layout_on_a_folder_of_documents(tmp_path):
  folder = tmp_path / "docs"
  # Train documents (the first 9 of 10) use lowercase, the validation document uppercase.
  train_texts = _write_documents(folder, 9, "abcdef")
  (folder / "doc_99.txt").write_text(" ".join(["ABC DEF"] * 40) + "\n", encoding="utf-8")
  config = pipeline.default_data_config()
  config.update(path=str(folder), tfds_data_dir=str(tmp_path / "tfds"), num_eval_windows=5,
                eval_batch_size=4)
  seq_len, batch = 16, 4
  data = _make(config, seq_len=seq_len, batch=batch, seed=3)
  assert data.layout == "packed"
  tokenizer = data.tokenizer
  stream = "".join(text + "\n" for text in train_texts)  # "\n" marks document ends.
  n_chunks = len(stream) // (seq_len + 1)
  batches = _take(data.train_iter, n_chunks // batch)
  rows = []
  for b in batches:
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    rows += [tokenizer.decode(np.append(i, t[-1])) for i, t in zip(b["inputs"], b["targets"])]
  chunks = [stream[i * (seq_len + 1):(i + 1) * (seq_len + 1)] for i in range(n_chunks)]
  assert len(set(rows)) == len(rows)  # No chunk repeats within an epoch.
  assert set(rows) <= set(chunks)
  assert rows != chunks[: len(rows)]  # Shuffled.
  eval_rows = [tokenizer.decode(np.append(i, t[-1]))
               for b in data.eval_batches() for i, t in zip(b["inputs"], b["targets"])]
  assert all(set(row) <= set("ABCDEF \n") for row in eval_rows)
  # The next epoch is shuffled differently.
  later = _take(data.train_iter, n_chunks // batch)
  later_rows = [tokenizer.decode(np.append(i, t[-1]))
                for b in later for i, t in zip(b["inputs"], b["targets"])]
  assert later_rows != rows
  # Two processes see the two halves of each global batch.
  halves = [_take(_make(config, seq_len=seq_len, batch=batch, seed=3, index=p, count=2)
                  .train_iter, 3) for p in range(2)]
  for step, global_batch in enumerate(batches[:3]):
    np.testing.assert_array_equal(
        np.concatenate([halves[0][step]["inputs"], halves[1][step]["inputs"]]),
        global_batch["inputs"])


def test_packed_sentencepiece_appends_eos_and_caches_model(tmp_path, monkeypatch):
  folder = tmp_path / "docs"
  _write_documents(folder, 10, "abcdefghij", seed=1)
  config = pipeline.default_data_config()
  config.update(path=str(folder), tfds_data_dir=str(tmp_path / "tfds"),
                tokenizer="sentencepiece", spm_vocab_size=40, num_eval_windows=4,
                eval_batch_size=4)
  data = _make(config, seq_len=16, batch=4)
  tokenizer = data.tokenizer
  assert isinstance(tokenizer, SentencePieceTokenizer) and tokenizer.vocab_size == 40
  tokens = np.concatenate([b["inputs"] for b in _take(data.train_iter, 20)])
  assert (tokens == tokenizer.eos_id).any()

  # A second call loads the cached model instead of training again.
  def fail(*args, **kwargs):
    raise AssertionError("the cached SentencePiece model should have been reused")

  monkeypatch.setattr(SentencePieceTokenizer, "train_from_text", fail)
  again = _make(config, seq_len=16, batch=4)
  assert again.tokenizer.model_proto == tokenizer.model_proto


# --- configuration and clear errors -----------------------------------------------------


def test_default_config_reads_environment(monkeypatch):
  monkeypatch.setenv("DECODER_JAX_DATA", "/some/data")
  config = pipeline.default_data_config()
  assert config.local_dir == "/some/data"
  assert config.corpus == "tiny_shakespeare" and config.tokenizer == "char"
  assert config.layout == "auto" and config.val_fraction == 0.1
  monkeypatch.delenv("DECODER_JAX_DATA")
  assert pipeline.default_data_config().local_dir is None


def test_missing_corpus_path(tmp_path):
  config = pipeline.default_data_config()
  config.update(path=str(tmp_path / "nowhere.txt"), tfds_data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="nowhere.txt does not exist"):
    _make(config)
  config.update(path=None, local_dir=str(tmp_path), corpus="no_such_corpus")
  with pytest.raises(FileNotFoundError, match="no_such_corpus does not exist"):
    _make(config)
  (tmp_path / "empty_folder").mkdir()
  config.update(path=str(tmp_path / "empty_folder"))
  with pytest.raises(FileNotFoundError, match="empty_folder contains no .txt files"):
    _make(config)


def test_empty_corpus_and_too_short_split(tmp_path):
  config = pipeline.default_data_config()
  (tmp_path / "empty.txt").write_text("")
  config.update(path=str(tmp_path / "empty.txt"), tfds_data_dir=str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match="empty.txt is empty"):
    _make(config)
  (tmp_path / "short.txt").write_text("to be or not to be, " * 20)  # 400 characters.
  config.update(path=str(tmp_path / "short.txt"))
  with pytest.raises(ValueError, match="validation split of corpus .*short.txt has 40 tokens"):
    _make(config, seq_len=64)


def test_non_utf8_corpus_names_file_and_offset(tmp_path):
  (tmp_path / "latin1.txt").write_bytes("hello caf\u00e9 world".encode("latin-1"))
  config = pipeline.default_data_config()
  config.update(path=str(tmp_path / "latin1.txt"), tfds_data_dir=str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8.*0xe9 at byte offset 9"):
    _make(config)


def test_bad_batch_sizes_and_names(tfds_dir):
  with pytest.raises(ValueError, match="global_batch_size=12 must be a positive multiple .* 5"):
    _make(_config(tfds_dir), batch=12, count=5)
  with pytest.raises(ValueError, match="eval_batch_size=63"):
    _make(_config(tfds_dir, eval_batch_size=63), count=2)
  with pytest.raises(ValueError, match="data.tokenizer 'bpe'"):
    _make(_config(tfds_dir, tokenizer="bpe"))
  with pytest.raises(ValueError, match="data.layout 'random'"):
    _make(_config(tfds_dir, layout="random"))


def test_tiny_shakespeare_ships_with_the_package(monkeypatch, tmp_path):
  """The bundled file is the real corpus, and a config with no folder set reads it (no
  environment variable, no download, no TensorFlow); a local folder still wins."""
  data = SHAKESPEARE.read_bytes()
  assert len(data) == 1_115_394
  assert hashlib.sha256(data).hexdigest() == (
      "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed")
  monkeypatch.delenv("DECODER_JAX_DATA", raising=False)
  config = pipeline.default_data_config()
  assert pipeline.corpus_location(config) == str(DATA / "tiny_shakespeare")
  (tmp_path / "tiny_shakespeare").mkdir()
  monkeypatch.setenv("DECODER_JAX_DATA", str(tmp_path))
  assert pipeline.corpus_location(pipeline.default_data_config()) == str(
      tmp_path / "tiny_shakespeare")
  config.update(corpus="not_bundled")
  assert pipeline.corpus_location(config) == "tfds:not_bundled"


def test_catalog_corpus_offline_error_says_what_to_set(tmp_path, monkeypatch):
  config = pipeline.default_data_config()
  config.update(local_dir=None, path=None, tfds_data_dir=str(tmp_path))
  monkeypatch.setattr(text_corpus, "bundled_corpus", lambda name: None)  # the catalog's copy
  # Preparing the catalog copy is refused up front without TensorFlow; with it, a failed
  # download is reported the same way.
  if not text_corpus.tensorflow_installed():
    with pytest.raises(text_corpus.CorpusUnavailableError,
                       match="needs TensorFlow.*data.local_dir.*DECODER_JAX_DATA.*data.path"):
      _make(config)
    monkeypatch.setattr(text_corpus, "tensorflow_installed", lambda: True)

  def offline(*args, **kwargs):
    raise ConnectionError("Failed to resolve 'raw.githubusercontent.com'")

  monkeypatch.setattr(tfds.builder_cls("tiny_shakespeare"), "download_and_prepare", offline)
  with pytest.raises(text_corpus.CorpusUnavailableError,
                     match="tiny_shakespeare' failed.*data.local_dir.*DECODER_JAX_DATA"):
    _make(config)


def test_missing_test_data_skips_on_a_users_machine_and_fails_on_ci(monkeypatch, tmp_path):
  """The conftest's rule: without ../shared/data and DECODER_JAX_DATA a test whose data is
  absent is skipped (reason in the summary); with either, the same absence fails it."""
  import conftest

  monkeypatch.delenv("DECODER_JAX_DATA", raising=False)
  monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path / "no_shared" / "data")
  with pytest.raises(pytest.skip.Exception, match="missing test data: multi30k not under"):
    conftest.require_data("multi30k")
  (tmp_path / "shared" / "data" / "sst2").mkdir(parents=True)
  monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path / "shared" / "data")  # as in CI
  assert conftest.require_data("sst2") == tmp_path / "shared" / "data"
  with pytest.raises(pytest.fail.Exception, match="missing test data: multi30k"):
    conftest.require_data("multi30k", "sst2")
  monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path / "no_shared" / "data")
  monkeypatch.setenv("DECODER_JAX_DATA", str(tmp_path / "elsewhere"))
  with pytest.raises(pytest.fail.Exception, match="elsewhere"):
    conftest.require_data("sst2")

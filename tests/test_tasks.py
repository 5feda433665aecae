"""Tests for fine-tuning data: task sources (parallel text, labelled TSV, catalog errors)
and tasks (prompt/response weights, truncation, length buckets, resumable order).

Exact token positions are checked with a character tokenizer (one token a character);
chat templates and label words with the real SmolLM2 tokenizer (read from the cached
GGUF, weights not loaded; skipped only when it is not cached and the index is offline).
"""

import gzip
import json
import string
from types import SimpleNamespace

import numpy as np
import pytest

from decoder_jax.data import task_sources, tasks, text_corpus
from decoder_jax.data.tokenizers import CharTokenizer

from conftest import smollm2_gguf

CHARS = string.ascii_letters + string.digits + " :\n.,'#"
TEMPLATE = "S:{source}\nT:"  # Prompt "S:<source>\nT:"; the response is " <target>#".
MAX_LENGTH, BUCKETS = 64, (16, 32, 64)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))  # Prepared copies shared by the module.


@pytest.fixture(scope="module")
def char_tok():
  return CharTokenizer.from_text(CHARS)


@pytest.fixture(scope="module")
def eos(char_tok):
  return char_tok.encode("#")[0]


@pytest.fixture(scope="module")
def smol_tok():
  from decoder_jax.interop import gguf
  return gguf.tokenizer_from_gguf(smollm2_gguf())  # Tokenizer metadata only, no weights.


def _write_parallel(folder, split, sources, targets, gz=True):
  folder.mkdir(parents=True, exist_ok=True)
  for lang, lines in (("en", sources), ("fr", targets)):
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    if gz:
      (folder / f"{split}.{lang}.gz").write_bytes(gzip.compress(data))
    else:
      (folder / f"{split}.{lang}").write_bytes(data)


def _random_words(rng, count, max_words):
  return [" ".join("".join(rng.choice(list(string.ascii_lowercase), size=rng.integers(1, 6)))
                   for _ in range(rng.integers(1, max_words + 1))) for _ in range(count)]


@pytest.fixture(scope="module")
def toy_parallel(tmp_path_factory):
  """A small en-fr directory: 37 train pairs of varied length, 20 val pairs."""
  folder = tmp_path_factory.mktemp("toy") / "toy_parallel"
  rng = np.random.default_rng(0)
  for split, count in (("train", 37), ("val", 20)):
    # At most 4 + 3 words: every example fits MAX_LENGTH, none is truncated.
    sources = [f"{split}{i} " + s for i, s in enumerate(_random_words(rng, count, 4))]
    _write_parallel(folder, split, sources, _random_words(rng, count, 3))
  return folder


def _char_config(source, tfds_dir, **overrides):
  config = tasks.default_task_config()
  config.update(source=str(source), tfds_data_dir=tfds_dir, prompt_template=TEMPLATE,
                max_length=MAX_LENGTH, buckets=BUCKETS)
  config.update(overrides)
  return config


def _make(config, tok, *, batch=4, eval_batch=8, seed=3, index=0, count=1):
  return tasks.make_task_datasets(config, tok, global_batch_size=batch,
                                  eval_batch_size=eval_batch, seed=seed,
                                  process_index=index, process_count=count)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


# --- prompts, weights, eos ---------------------------------------------------------------


def test_prompt_has_zero_weight_and_response_plus_eos_has_weight_one(char_tok, eos):
  task = tasks.TranslationTask(char_tok, TEMPLATE, eos_id=eos)
  prompt, response = task.encode({"source": "ab", "target": "xyz"})
  assert char_tok.decode(prompt) == "S:ab\nT:"  # 7 tokens
  assert char_tok.decode(response) == " xyz#" and response[-1] == eos
  data = tasks.encode_examples(task, [{"source": "ab", "target": "xyz"}], MAX_LENGTH)
  batch = tasks.collate(data, np.array([0]), 16, pad_id=0, label_words=False)
  seq = prompt + response  # 12 tokens: 11 inputs and targets
  np.testing.assert_array_equal(batch["inputs"][0, :11], seq[:-1])
  np.testing.assert_array_equal(batch["targets"][0, :11], seq[1:])
  expected = np.zeros(16, np.float32)
  expected[6:11] = 1.0  # targets 6..10 are " ", "x", "y", "z", "#"
  np.testing.assert_array_equal(batch["weights"][0], expected)
  assert char_tok.decode(batch["targets"][0][batch["weights"][0] > 0]) == " xyz#"
  assert batch["targets"][0, 10] == eos
  np.testing.assert_array_equal(batch["inputs"][0, 11:], 0)  # padding
  assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
  assert batch["weights"].dtype == np.float32


def test_sft_task_learns_only_the_response_field(char_tok, eos):
  task = tasks.SFTTask(char_tok, "Q:{question}\nA:", response_field="answer", eos_id=eos)
  prompt, response = task.encode({"question": "hi", "answer": "yo"})
  assert char_tok.decode(prompt) == "Q:hi\nA:" and char_tok.decode(response) == " yo#"
  with pytest.raises(ValueError, match="'answer' is missing from an example with fields"):
    task.encode({"question": "hi", "reply": "yo"})
  with pytest.raises(ValueError, match="needs field 'question'"):
    task.encode({"answer": "yo"})
  with pytest.raises(ValueError, match="shows the response field"):
    tasks.SFTTask(char_tok, "Q:{question} {answer}", response_field="answer", eos_id=eos)
  assert task.decode_response(char_tok.encode(" yo#zz")) == "yo"  # cut at eos, stripped


def test_tokenizer_without_eos_needs_an_explicit_one(char_tok):
  assert char_tok.eos_id is None
  with pytest.raises(ValueError, match="no end-of-sequence id.*task.eos_id"):
    tasks.TranslationTask(char_tok, TEMPLATE)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tasks.TranslationTask(char_tok, TEMPLATE, eos_id=char_tok.vocab_size)


def test_template_errors_name_the_placeholder(char_tok, eos):
  with pytest.raises(ValueError, match=r"lacks the placeholder \{source\}"):
    tasks.TranslationTask(char_tok, "Translate: {text}\nFrench:", eos_id=eos)
  with pytest.raises(ValueError, match=r"unknown placeholder \{sorce\}"):
    tasks.TranslationTask(char_tok, "{source} {sorce}", eos_id=eos)
  with pytest.raises(ValueError, match=r"lacks the placeholder \{text\}"):
    tasks.ClassificationTask(char_tok, ("0", "1"), "Review: {review}", mode="head")
  with pytest.raises(ValueError, match="not a valid template"):
    tasks.PromptTemplate("{source")
  with pytest.raises(ValueError, match="plain name"):
    tasks.PromptTemplate("{0} and {}")


def test_config_is_validated_before_any_data_is_read(char_tok, tmp_path):
  missing_dir = tmp_path / "does_not_exist"
  config = _char_config(missing_dir, str(tmp_path), eos_id=3)
  with pytest.raises(ValueError, match="task.kind 'summarise'"):
    _make(_char_config(missing_dir, str(tmp_path), kind="summarise"), char_tok)
  with pytest.raises(ValueError, match=r"lacks the placeholder \{source\}"):
    _make(_char_config(missing_dir, str(tmp_path), eos_id=3, prompt_template="{text}"),
          char_tok)
  with pytest.raises(ValueError, match="task.mode 'logits'"):
    _make(_char_config(missing_dir, str(tmp_path), kind="classification", mode="logits",
                       prompt_template="{text}"), char_tok)
  with pytest.raises(ValueError, match="task.buckets must be ascending"):
    _make(_char_config(missing_dir, str(tmp_path), eos_id=3, buckets=(32, 16)), char_tok)
  with pytest.raises(ValueError, match="global_batch_size=3 must be a positive multiple"):
    _make(config, char_tok, batch=3, count=2)
  with pytest.raises(FileNotFoundError, match="does_not_exist"):  # only now the data
    _make(config, char_tok)


# --- truncation --------------------------------------------------------------------------


def test_fit_length_cuts_the_prompt_from_the_left_or_drops():
  prompt, response = list(range(10)), [90, 91, 92]
  assert tasks.fit_length(prompt, response, max_length=12) == (prompt, response)  # 13 = L + 1
  assert tasks.fit_length(prompt, response, max_length=8) == ([4, 5, 6, 7, 8, 9], response)
  assert tasks.fit_length(prompt, response, max_length=3) == ([9], response)
  assert tasks.fit_length(prompt, response, max_length=2) is None
  assert tasks.fit_length(prompt, [], max_length=4, lm_style=False) == ([6, 7, 8, 9], [])


def test_truncation_keeps_the_response_and_counts(char_tok, eos):
  task = tasks.TranslationTask(char_tok, TEMPLATE, eos_id=eos)
  examples = [{"source": "short", "target": "ok"},  # 12 + 4 tokens: fits
              {"source": "a much longer source sentence", "target": "fine"},  # cut
              {"source": "x", "target": "far too long a target for this"}]  # dropped
  data = tasks.encode_examples(task, examples, max_length=16)
  assert data.stats == {"examples": 3, "kept": 2, "truncated": 1, "dropped": 1}
  assert max(data.lengths) <= 16
  cut = data.tokens[1]
  assert len(cut) == 17 and char_tok.decode(cut).endswith("sentence\nT: fine#")
  assert data.prompt_lens[1] == 17 - len(" fine#")


# --- batches -----------------------------------------------------------------------------


def test_buckets_default_to_powers_of_two():
  assert tasks.bucket_lengths(128) == (16, 32, 64, 128)
  assert tasks.bucket_lengths(100) == (16, 32, 64, 100)
  assert tasks.bucket_lengths(256, (64, 192)) == (64, 192, 256)
  with pytest.raises(ValueError, match="ascending lengths in"):
    tasks.bucket_lengths(64, (32, 128))


def test_batches_pad_to_the_smallest_bucket_with_zero_weight(toy_parallel, tfds_dir, char_tok,
                                                            eos):
  data = _make(_char_config(toy_parallel, tfds_dir, eos_id=eos), char_tok)
  assert data.pad_id == eos and data.buckets == BUCKETS and data.steps_per_epoch == 37 // 4
  assert data.train_stats == {"examples": 37, "kept": 37, "truncated": 0, "dropped": 0}
  raw = task_sources.load_parallel(toy_parallel, "train", "en", "fr", data_dir=tfds_dir)
  texts = {f"S:{e['source']}\nT: {e['target']}#" for e in raw}
  seen_lengths = set()
  for batch in _take(data.train_iter, 12):
    assert set(batch) == {"inputs", "targets", "weights"}
    length = batch["inputs"].shape[1]
    assert batch["inputs"].shape == batch["targets"].shape == batch["weights"].shape
    assert batch["inputs"].shape[0] == 4 and length in BUCKETS
    n = np.array([np.nonzero(w)[0].max() + 1 for w in batch["weights"]])  # eos ends a row
    assert length == min(b for b in BUCKETS if b >= n.max())
    seen_lengths.add(length)
    for row, real in enumerate(n):
      seq = np.append(batch["inputs"][row, :real], batch["targets"][row, real - 1])
      assert char_tok.decode(seq) in texts
      assert (batch["inputs"][row, real:] == eos).all()
      assert (batch["targets"][row, real:] == eos).all()
      assert (batch["weights"][row, real:] == 0).all()
  assert len(seen_lengths) > 1 and min(seen_lengths) < MAX_LENGTH  # not all max_length


def test_same_seed_and_step_give_the_same_batch(toy_parallel, tfds_dir, char_tok, eos):
  config = _char_config(toy_parallel, tfds_dir, eos_id=eos)
  first = _take(_make(config, char_tok, seed=7).train_iter, 20)
  _assert_same_batches(first, _take(_make(config, char_tok, seed=7).train_iter, 20))
  other = _take(_make(config, char_tok, seed=8).train_iter, 20)
  assert any(a["inputs"].shape != b["inputs"].shape or (a["inputs"] != b["inputs"]).any()
             for a, b in zip(first, other))


def test_epochs_cover_distinct_examples_and_are_reshuffled(toy_parallel, tfds_dir, char_tok,
                                                           eos):
  data = _make(_char_config(toy_parallel, tfds_dir, eos_id=eos, bucket_window=100), char_tok)
  steps = data.steps_per_epoch  # 9 batches of 4: one example sits out each epoch

  def rows(batches):
    out = []
    for batch in batches:
      n = [np.nonzero(w)[0].max() + 1 for w in batch["weights"]]
      out.append([tuple(batch["inputs"][r, :k]) for r, k in enumerate(n)])
    return out

  epoch0, epoch1 = rows(_take(data.train_iter, steps)), rows(_take(data.train_iter, steps))
  flat0 = [r for b in epoch0 for r in b]
  assert len(set(flat0)) == len(flat0) == steps * 4
  assert epoch0 != epoch1
  # One sorting window spans the epoch, so batches hold consecutive lengths.
  ranges = sorted((min(map(len, b)), max(map(len, b))) for b in epoch0)
  assert all(prev[1] <= nxt[0] for prev, nxt in zip(ranges, ranges[1:]))


def test_resume_from_state_gives_identical_batches(toy_parallel, tfds_dir, char_tok, eos):
  config = _char_config(toy_parallel, tfds_dir, eos_id=eos)
  expected = _take(_make(config, char_tok).train_iter, 14)[5:]  # crosses into epoch 1
  interrupted = _make(config, char_tok).train_iter
  _take(interrupted, 5)
  state = json.loads(json.dumps(interrupted.get_state()))  # as a checkpoint stores it
  resumed = _make(config, char_tok).train_iter
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 9), expected)


def test_processes_split_the_global_batch(toy_parallel, tfds_dir, char_tok, eos):
  config = _char_config(toy_parallel, tfds_dir, eos_id=eos)
  whole = _make(config, char_tok)
  halves = [_make(config, char_tok, index=p, count=2) for p in range(2)]
  parts = [_take(h.train_iter, 4) for h in halves]
  for step, batch in enumerate(_take(whole.train_iter, 4)):
    for key in batch:
      assert parts[0][step][key].shape[0] == 2
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][key], parts[1][step][key]]), batch[key])
  evals = [list(h.eval_batches()) for h in halves]
  for step, batch in enumerate(whole.eval_batches()):
    for key in batch:
      np.testing.assert_array_equal(
          np.concatenate([evals[0][step][key], evals[1][step][key]]), batch[key])


def test_eval_batches_are_fixed_and_padding_rows_weigh_zero(toy_parallel, tfds_dir, char_tok,
                                                            eos):
  config = _char_config(toy_parallel, tfds_dir, eos_id=eos)
  data = _make(config, char_tok, seed=1)
  assert data.eval_split == "val"  # found among the files, as no eval_split is set
  first, second = list(data.eval_batches()), list(data.eval_batches())
  _assert_same_batches(first, second)
  _assert_same_batches(first, list(_make(config, char_tok, seed=2).eval_batches()))
  assert data.num_eval_batches == 3  # 20 examples, batches of 8
  rows_used = [(b["weights"].sum(axis=1) > 0) for b in first]
  np.testing.assert_array_equal(rows_used[-1], [1, 1, 1, 1, 0, 0, 0, 0])
  assert sum(r.sum() for r in rows_used) == 20
  assert (first[-1]["inputs"][4:] == eos).all()
  with pytest.raises(ValueError):
    first[0]["inputs"][0, 0] = 1  # read-only, so no caller can change later calls
  example = data.eval_examples[0]
  raw = task_sources.load_parallel(toy_parallel, "val", "en", "fr", data_dir=tfds_dir)[0]
  assert char_tok.decode(example["prompt_ids"]) == f"S:{raw['source']}\nT:"
  assert example["reference"] == raw["target"] and example["source"] == raw["source"]


def test_max_examples_take_the_first_lines(toy_parallel, tfds_dir, char_tok, eos):
  data = _make(_char_config(toy_parallel, tfds_dir, eos_id=eos, max_train_examples=8,
                            max_eval_examples=5), char_tok)
  assert data.train_stats["examples"] == 8 and data.steps_per_epoch == 2
  assert [e["source"].split()[0] for e in data.eval_examples] == [f"val{i}" for i in range(5)]
  with pytest.raises(ValueError, match="fewer than one global batch of 16"):
    _make(_char_config(toy_parallel, tfds_dir, eos_id=eos, max_train_examples=8), char_tok,
          batch=16)


# --- sources -----------------------------------------------------------------------------


def test_parallel_files_with_different_line_counts(tmp_path):
  folder = tmp_path / "bad"
  _write_parallel(folder, "train", ["a", "b", "c"], ["x", "y"], gz=False)
  with pytest.raises(ValueError, match=r"train\.en has 3 lines but .*train\.fr has 2"):
    task_sources.load_parallel(folder, "train", "en", "fr", data_dir=str(tmp_path / "t"))


def test_changed_parallel_file_is_prepared_again(tmp_path):
  folder = tmp_path / "p"
  _write_parallel(folder, "train", ["one", "two"], ["un", "deux"])
  first = task_sources.load_parallel(folder, "train", "en", "fr", data_dir=str(tmp_path / "t"))
  assert first == [{"source": "one", "target": "un"}, {"source": "two", "target": "deux"}]
  _write_parallel(folder, "train", ["three"], ["trois"], gz=False)  # now both .gz and plain
  with pytest.raises(ValueError, match="keep one"):
    task_sources.load_parallel(folder, "train", "en", "fr", data_dir=str(tmp_path / "t"))
  for lang in ("en", "fr"):
    (folder / f"train.{lang}.gz").unlink()
  again = task_sources.load_parallel(folder, "train", "en", "fr", data_dir=str(tmp_path / "t"))
  assert again == [{"source": "three", "target": "trois"}]
  with pytest.raises(ValueError, match=r"no split 'test'; it has \['train'\]"):
    task_sources.load_parallel(folder, "test", "en", "fr", data_dir=str(tmp_path / "t"))


def test_tsv_label_outside_the_set_and_missing_column(tmp_path):
  folder = tmp_path / "tsv"
  folder.mkdir()
  (folder / "train.tsv").write_text("label\tcontent\n0\tfine\n1\tgood\n2\tbad\n")
  with pytest.raises(ValueError, match=r"train\.tsv line 4: label '2' is not one of the "
                                       r"configured labels \['0', '1'\]"):
    task_sources.load_labelled(folder, "train", ("0", "1"), data_dir=str(tmp_path / "t"))
  (folder / "train.tsv").write_text("label\treview\n0\tfine\n")
  with pytest.raises(ValueError, match=r"no text column 'content'; the header line has "
                                       r"columns \['label', 'review'\]"):
    task_sources.load_labelled(folder, "train", ("0", "1"), text_field="content",
                               data_dir=str(tmp_path / "t"))
  rows = task_sources.load_labelled(folder, "train", ("0", "1"), text_field="review",
                                    data_dir=str(tmp_path / "t"))
  assert rows == [{"text": "fine", "label": 0}]


def test_catalog_datasets_offline_say_to_pass_a_local_directory(tmp_path, monkeypatch):
  data_dir = str(tmp_path)
  if not text_corpus.tensorflow_installed():
    with pytest.raises(task_sources.TaskDataUnavailableError,
                       match="wmt14_translate/fr-en.*needs TensorFlow.*local directory"):
      task_sources.load_parallel("wmt14_translate/fr-en", "train", "fr", "en",
                                 data_dir=data_dir)
    monkeypatch.setattr(text_corpus, "tensorflow_installed", lambda: True)

  def offline(*args, **kwargs):
    raise ConnectionError("Failed to resolve 'storage.googleapis.com'")

  from tensorflow_datasets.text import glue  # importing registers the builder
  monkeypatch.setattr(glue.Glue, "download_and_prepare", offline)
  with pytest.raises(task_sources.TaskDataUnavailableError,
                     match="glue/sst2' failed.*ConnectionError.*local directory.*sst2"):
    task_sources.load_labelled("glue/sst2", "train", ("0", "1"), data_dir=data_dir)
  with pytest.raises(task_sources.TaskDataUnavailableError,
                     match="neither an existing directory nor a tfds catalog"):
    task_sources.load_labelled("no_such_dataset_here", "train", ("0", "1"), data_dir=data_dir)


class _FakeSource(list):
  def __getitems__(self, indices):
    return [self[i] for i in indices]


def _fake_catalog(features, rows):
  info = SimpleNamespace(features=dict.fromkeys(features), splits={"train": None})
  return lambda *args, **kwargs: SimpleNamespace(
      info=info, as_data_source=lambda split: _FakeSource(rows))


def test_prepared_catalog_rows_map_to_examples(monkeypatch):
  rows = [{"en": b"Hello.", "fr": "Bonjour.".encode()}, {"en": b"Yes.", "fr": b"Oui."}]
  monkeypatch.setattr(task_sources, "catalog_builder", _fake_catalog(["en", "fr"], rows))
  assert task_sources.load_parallel("wmt14_translate/fr-en", "train", "fr", "en",
                                    max_examples=1) == [{"source": "Bonjour.",
                                                         "target": "Hello."}]
  with pytest.raises(ValueError, match="no field for language 'de'"):
    task_sources.load_parallel("wmt14_translate/fr-en", "train", "en", "de")
  with pytest.raises(ValueError, match=r"no split 'val'; it has \['train'\]"):
    task_sources.load_parallel("wmt14_translate/fr-en", "val", "en", "fr")
  rows = [{"idx": 0, "label": 1, "sentence": b"great fun"},
          {"idx": 1, "label": -1, "sentence": b"unlabelled"}]
  monkeypatch.setattr(task_sources, "catalog_builder",
                      _fake_catalog(["idx", "label", "sentence"], rows))
  assert task_sources.load_labelled("glue/sst2", "train", ("0", "1"), max_examples=1) == [
      {"text": "great fun", "label": 1}]
  with pytest.raises(ValueError, match="example 1: label -1 is not an index"):
    task_sources.load_labelled("glue/sst2", "train", ("0", "1"))


def test_sft_from_jsonl_and_several_eval_splits(tmp_path, char_tok, eos):
  folder = tmp_path / "chat"
  folder.mkdir()
  for split, count in (("train", 6), ("dev", 3), ("test", 2)):
    lines = [json.dumps({"prompt": f"q{i}", "response": f"answer {i}"}) for i in range(count)]
    (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
  config = _char_config(folder, str(tmp_path / "t"), kind="sft", eos_id=eos,
                        prompt_template="Q:{prompt}\nA:", eval_split="dev,test")
  data = _make(config, char_tok, batch=2, eval_batch=2)
  assert list(data.eval_sets) == ["dev", "test"] and data.eval_split == "dev"
  assert [e["reference"] for e in data.eval_examples] == ["answer 0", "answer 1", "answer 2"]
  assert char_tok.decode(data.eval_examples[2]["prompt_ids"]) == "Q:q2\nA:"
  assert sum(b["weights"].sum() for b in data.eval_batches("test")) == 2 * len(" answer 0#")
  batch = next(data.train_iter)
  text = char_tok.decode(batch["targets"][0][batch["weights"][0] > 0])
  assert text.startswith(" answer ") and text.endswith("#")
  (folder / "train.jsonl").write_text('{"prompt": "q"}\n[1, 2]\n')
  with pytest.raises(ValueError, match=r"train\.jsonl line 2 is a JSON list"):
    _make(config, char_tok, batch=1, eval_batch=2)


def test_real_multi30k_loads(task_data_dir, tfds_dir):
  folder = task_data_dir / "multi30k"
  rows = task_sources.load_parallel(folder, "train", "en", "fr", data_dir=tfds_dir,
                                    max_examples=100)
  assert len(rows) == 100
  with gzip.open(folder / "train.en.gz", "rt", encoding="utf-8") as f:
    assert rows[0]["source"] == f.readline().rstrip("\n")
  assert rows[0] == {"source": "Two young, White males are outside near many bushes.",
                     "target": "Deux jeunes hommes blancs sont dehors près de buissons."}
  assert len(task_sources.load_parallel(folder, "val", "en", "fr", data_dir=tfds_dir)) == 1014
  assert sorted(task_sources.parallel_files(folder, "en", "de")) == [
      "test_2016_flickr", "train", "val"]


def test_real_sst2_loads(task_data_dir, tfds_dir):
  folder = task_data_dir / "sst2"
  dev = task_sources.load_labelled(folder, "dev", ("0", "1"), data_dir=tfds_dir)
  assert len(dev) == 872
  assert dev[0] == {"text": "one long string of cliches .", "label": 0}
  # train.tsv names its text column "sentence" and ends lines with "\r\n".
  train = task_sources.load_labelled(folder, "train", ("0", "1"), data_dir=tfds_dir,
                                     max_examples=100)
  assert len(train) == 100
  assert train[0] == {"text": "hide new secretions from the parental units", "label": 0}
  with open(folder / "train.tsv", encoding="utf-8", newline="") as f:
    lines = [f.readline() for _ in range(101)][1:]
  assert [r["label"] for r in train] == [int(line.split("\t")[0]) for line in lines]


# --- real tokenizer: chat template, label words ---------------------------------------


def test_chat_template_prompt_and_response_weights(smol_tok, task_data_dir, tfds_dir):
  config = tasks.default_task_config()
  config.update(source=str(task_data_dir / "multi30k"), tfds_data_dir=tfds_dir,
                use_chat_template=True, max_length=128, max_train_examples=16,
                max_eval_examples=4)
  data = _make(config, smol_tok)
  assert data.eval_split == "val" and data.train_stats["truncated"] == 0
  example = data.eval_examples[0]
  prompt = smol_tok.decode(example["prompt_ids"])
  assert prompt.endswith("<|im_start|>user\nTranslate English to French:\nA group of men are "
                         "loading cotton onto a truck\nFrench:<|im_end|>\n"
                         "<|im_start|>assistant\n")
  batch = next(data.train_iter)
  for row in range(4):
    weighted = batch["targets"][row][batch["weights"][row] > 0]
    assert weighted[-1] == smol_tok.eos_id == smol_tok.token_to_id("<|im_end|>")
    reply = smol_tok.decode(weighted[:-1])
    assert not reply.startswith(" ")  # no response prefix inside a chat turn
    first = int(np.nonzero(batch["weights"][row])[0][0])
    assert smol_tok.decode(batch["inputs"][row, :first + 1]).endswith("<|im_start|>assistant\n")
  assert data.task.decode_response(smol_tok.encode("Un chien.<|im_end|>\n")) == "Un chien."


def test_label_words_and_head_batches(smol_tok, task_data_dir, tfds_dir):
  config = tasks.default_task_config()
  config.update(kind="classification", source=str(task_data_dir / "sst2"), tfds_data_dir=tfds_dir,
                max_length=64, max_train_examples=64, max_eval_examples=10)
  data = _make(config, smol_tok, batch=8, eval_batch=8)
  task = data.task
  np.testing.assert_array_equal(task.label_token_ids, [smol_tok.token_to_id("Ġnegative"),
                                                       smol_tok.token_to_id("Ġpositive")])
  batch = next(data.train_iter)
  assert set(batch) == {"inputs", "targets", "weights", "labels", "answer_index"}
  rows = np.arange(8)
  np.testing.assert_array_equal(batch["targets"][rows, batch["answer_index"]],
                                task.label_token_ids[batch["labels"]])
  np.testing.assert_array_equal(batch["weights"].sum(axis=1), 1.0)  # only the label word
  assert (batch["weights"][rows, batch["answer_index"]] == 1).all()
  assert smol_tok.decode(batch["inputs"][0, :batch["answer_index"][0] + 1]).endswith(
      "\nSentiment:")
  eval_batches = list(data.eval_batches())
  assert [b["weights"].sum() for b in eval_batches] == [8.0, 2.0]
  with open(task_data_dir / "sst2" / "dev.tsv", encoding="utf-8") as f:
    labels = [int(line.split("\t")[0]) for line in f.readlines()[1:11]]
  assert [e["label"] for e in data.eval_examples] == labels
  assert data.eval_examples[0]["text"] == "one long string of cliches ."

  config.mode = "head"
  head = _make(config, smol_tok, batch=8, eval_batch=8)
  batch = next(head.train_iter)
  assert set(batch) == {"inputs", "last_index", "labels", "weights"}
  assert batch["last_index"].dtype == batch["labels"].dtype == np.int32
  for row in range(8):
    last = batch["last_index"][row]
    assert smol_tok.decode(batch["inputs"][row, :last + 1]).endswith("\nSentiment:")
    assert (batch["inputs"][row, last + 1:] == head.pad_id).all()
  np.testing.assert_array_equal(list(head.eval_batches())[-1]["weights"], [1, 1, 0, 0, 0, 0, 0, 0])


def test_label_word_must_be_one_token(smol_tok, char_tok):
  assert len(smol_tok.encode(" supercalifragilistic", add_special_tokens=False)) > 1
  with pytest.raises(ValueError, match="Label word ' supercalifragilistic' encodes to 6 tokens"):
    tasks.ClassificationTask(smol_tok, ("0", "1"), label_words=(" negative",
                                                                " supercalifragilistic"))
  with pytest.raises(ValueError, match="one word per label"):
    tasks.ClassificationTask(smol_tok, ("0", "1", "2"), label_words=(" negative", " positive"))
  with pytest.raises(ValueError, match="encodes to 2 tokens"):  # a char tokenizer: letters
    tasks.ClassificationTask(char_tok, ("0", "1"), label_words=("no", "y"))

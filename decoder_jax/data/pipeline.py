"""Language-model batches from a text corpus: grain pipelines over an in-memory token stream.

Two layouts:
  * windows (one long text, nanoGPT): every row of step s starts at a uniform random
    offset of the train stream, drawn from an RNG seeded by (seed, s);
  * packed (many documents): documents + end-of-document token are concatenated, cut
    into seq_len + 1 chunks, shuffled (afresh each epoch) and batched.
Either way the global batch of step s depends only on (seed, s); process p of P keeps
rows [p * B/P, (p + 1) * B/P), so the global sequence is the same for any P. The grain
iterator's state is its step counter, so get_state()/set_state() resume exactly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import grain
import jax
from absl import logging
import ml_collections
import numpy as np
from ml_collections import config_dict

from decoder_jax.data import text_corpus
from decoder_jax.data.tokenizers import CharTokenizer, SentencePieceTokenizer, Tokenizer
from decoder_jax.errors import ConfigError, NotFound

LAYOUTS = ("auto", "windows", "packed")
TOKENIZERS = ("char", "sentencepiece")
# Eval windows use their own seed so they are the same whatever the training seed.
EVAL_SEED = 20240601
# Batches are cheap numpy gathers (~0.05 ms), so they are built in the caller's thread:
# grain's default thread pool costs ~10x more per batch than it saves here.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def default_data_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.corpus = "tiny_shakespeare"  # Folder under local_dir, else a tfds catalog name.
  config.local_dir = config_dict.placeholder(str)  # Folder like ../shared/data.
  if os.environ.get("DECODER_JAX_DATA"):
    config.local_dir = os.environ["DECODER_JAX_DATA"]
  config.path = config_dict.placeholder(str)  # A .txt file or folder; overrides the above.
  config.tokenizer = "char"  # "char" | "sentencepiece".
  config.spm_model = config_dict.placeholder(str)  # None: train one (cached) on train split.
  config.spm_vocab_size = 1000
  config.seq_len = config_dict.placeholder(int)  # Training window; None: model.max_length.
  config.layout = "auto"  # "auto" | "windows" | "packed".
  config.val_fraction = 0.1
  config.num_eval_windows = 500
  config.eval_batch_size = 64  # Global, like global_batch_size.
  config.tfds_data_dir = config_dict.placeholder(str)  # None: the tfds default.
  return config


@dataclasses.dataclass
class Datasets:
  tokenizer: Tokenizer
  # next() -> {"inputs", "targets"}: int32 [local_batch, seq_len]; get_state()/set_state().
  train_iter: grain.DatasetIterator
  layout: str = "windows"  # The resolved layout, "windows" or "packed".
  eval_batch_list: list[dict[str, np.ndarray]] = dataclasses.field(
      default_factory=list, repr=False)

  def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """The same batches every call.

    inputs, targets: int32 [local_eval_batch, seq_len]; weights: float32, same shape,
    0 on the padding rows of the last batch.
    """
    for batch in self.eval_batch_list:
      yield dict(batch)  # Arrays are read-only, so sharing them across calls is safe.

  @property
  def num_eval_batches(self) -> int:
    return len(self.eval_batch_list)


def make_datasets(
    data_config,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    tokenizer: Tokenizer | None = None,
) -> Datasets:
  """Train and eval batches of `seq_len` tokens; `tokenizer` (e.g. a pretrained model's)
  replaces the one `data_config.tokenizer` would build."""
  config = _with_defaults(data_config)
  _check_choice("data.tokenizer", config.tokenizer, TOKENIZERS)
  _check_choice("data.layout", config.layout, LAYOUTS)
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
  if not 0 <= seed < 2**32:
    raise ConfigError(f"seed must lie in [0, 2**32); got {seed}.")
  if seq_len < 1:
    raise ConfigError(f"seq_len must be positive; got {seq_len}.")
  train_rows = _process_rows("global_batch_size", global_batch_size, process_index, process_count)
  eval_rows = _process_rows("data.eval_batch_size", config.eval_batch_size, process_index,
                            process_count)

  corpus = _load_corpus(config)
  layout = config.layout
  if layout == "auto":
    layout = "windows" if corpus.single_text else "packed"
  if tokenizer is None:
    tokenizer = _make_tokenizer(config, corpus, process_count)
  train_tokens = _token_stream(tokenizer, corpus.train, corpus.single_text)  # [n_train]
  val_tokens = _token_stream(tokenizer, corpus.validation, corpus.single_text)  # [n_val]
  for split, tokens in (("train", train_tokens), ("validation", val_tokens)):
    if len(tokens) < seq_len + 1:
      raise ConfigError(
          f"The {split} split of corpus {corpus.source} has {len(tokens)} tokens; one "
          f"window of seq_len + 1 = {seq_len + 1} tokens does not fit."
      )

  logging.info("Data: %s, %s layout, %d train / %d validation tokens, vocabulary %d.",
               corpus.source, layout, len(train_tokens), len(val_tokens), tokenizer.vocab_size)
  if process_count > 1:
    logging.info("Process %d of %d reads rows %d-%d of each training batch.", process_index,
                 process_count, train_rows.start, train_rows.stop - 1)
  if layout == "windows":
    train = _random_windows(train_tokens, seq_len, global_batch_size, seed, train_rows)
    eval_windows = _sample_windows(val_tokens, seq_len, config.num_eval_windows, EVAL_SEED)
  else:
    train = _packed_chunks(train_tokens, seq_len, global_batch_size, seed, train_rows)
    eval_windows = _subset(_chunk(val_tokens, seq_len), config.num_eval_windows, EVAL_SEED)
  return Datasets(
      tokenizer=tokenizer,
      train_iter=iter(train.to_iter_dataset(_READ_OPTIONS)),
      layout=layout,
      eval_batch_list=_eval_batches(eval_windows, config.eval_batch_size, eval_rows),
  )


def fill_defaults(section, defaults: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`defaults` with every field `section` sets copied over (an explicit None is kept;
  lists, as JSON gives them back, become tuples); fields `section` lacks keep their
  defaults, and fields only `section` has are ignored."""
  missing = object()
  for key in defaults:
    value = getattr(section, key, missing)
    if value is not missing:
      defaults[key] = tuple(value) if isinstance(value, list) else value
  return defaults


def _with_defaults(data_config) -> ml_collections.ConfigDict:
  """Copies the fields this module reads; ones `data_config` lacks take their defaults."""
  return fill_defaults(data_config, default_data_config())


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ConfigError(f"Unknown {name} {value!r}; choose one of {', '.join(choices)}.")


def _process_rows(name: str, global_size: int, process_index: int, process_count: int) -> slice:
  if global_size < 1 or global_size % process_count:
    raise ConfigError(
        f"{name}={global_size} must be a positive multiple of the process count "
        f"{process_count} (each process takes an equal slice of every batch)."
    )
  local_size = global_size // process_count
  return slice(process_index * local_size, (process_index + 1) * local_size)


def corpus_location(config) -> str:
  """Where `_load_corpus` reads: data.path; else data.local_dir/data.corpus; else the
  corpus bundled with the package; else "tfds:" + the catalog name."""
  if config.path:
    return str(Path(config.path).expanduser())
  if config.local_dir:
    folder = Path(config.local_dir).expanduser() / config.corpus
    if not folder.exists():
      raise NotFound(
          f"Corpus folder {folder} does not exist (data.local_dir={config.local_dir!r}, "
          f"data.corpus={config.corpus!r}); set data.local_dir (or DECODER_JAX_DATA) to a "
          "folder holding it, or data.path to a .txt file or folder."
      )
    return str(folder)
  bundled = text_corpus.bundled_corpus(config.corpus)
  return str(bundled) if bundled else "tfds:" + config.corpus


def _load_corpus(config) -> text_corpus.CorpusSplits:
  location = corpus_location(config)
  if location.startswith("tfds:"):
    return text_corpus.load_catalog_corpus(config.corpus, data_dir=config.tfds_data_dir)
  return text_corpus.load_local_corpus(
      location, val_fraction=config.val_fraction, data_dir=config.tfds_data_dir)


def _make_tokenizer(config, corpus: text_corpus.CorpusSplits, process_count: int) -> Tokenizer:
  if config.tokenizer == "char":
    # Vocabulary of the whole corpus, as nanoGPT builds it (for tiny shakespeare the
    # train split alone has the same 65 characters); "\n" joins documents.
    text = "".join(corpus.train) + "".join(corpus.validation)
    return CharTokenizer.from_text(text if corpus.single_text else text + "\n")
  if config.spm_model:
    return SentencePieceTokenizer.load(config.spm_model)
  cached = Path(os.fspath(corpus.cache_dir)) / f"spm_{config.spm_vocab_size}.model"
  if cached.exists():
    return SentencePieceTokenizer.load(cached)
  if process_count > 1:
    # Separate trainings on each host need not agree on the vocabulary.
    raise ConfigError(
        f"No SentencePiece model at {cached}: with {process_count} processes train one "
        "first (python -m decoder_jax.data.train_sentencepiece) and set data.spm_model."
    )
  with tempfile.TemporaryDirectory(dir=cached.parent) as scratch:
    SentencePieceTokenizer.train_from_text(
        "\n".join(corpus.train), Path(scratch) / "spm", config.spm_vocab_size)
    os.replace(Path(scratch) / "spm.model", cached)  # Atomic: never a half-written cache.
  return SentencePieceTokenizer.load(cached)


def _token_stream(tokenizer: Tokenizer, documents: list[str], single_text: bool) -> np.ndarray:
  """All documents as one int32 stream [n_tokens], each followed by an end marker.

  The end marker is eos for SentencePiece and "\n" for the char tokenizer, which has no
  eos (so a document that ends with a newline is followed by an empty line). A single
  text is one stream with no marker.
  """
  if single_text:
    return tokenizer.encode_array("".join(documents))
  if isinstance(tokenizer, CharTokenizer) or tokenizer.eos_id is None:
    return tokenizer.encode_array("".join(doc + "\n" for doc in documents))
  pieces = []
  for ids in tokenizer.encode_batch(documents):
    pieces += [np.asarray(ids, np.int32), np.array([tokenizer.eos_id], np.int32)]
  return np.concatenate(pieces)


@dataclasses.dataclass(frozen=True, eq=False)
class _WindowBatch:
  """random_map fn: step index + RNG seeded by (seed, step) -> this process's rows."""

  tokens: np.ndarray  # [n_tokens] int32
  seq_len: int
  global_batch_size: int
  rows: slice

  def __call__(self, step: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    del step  # The RNG already depends on it.
    # Every process draws all starts so the global batch is the same for any process count.
    starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.global_batch_size)
    return _inputs_and_targets(_gather(self.tokens, starts[self.rows], self.seq_len))


def _random_windows(tokens, seq_len, global_batch_size, seed, rows) -> grain.MapDataset:
  steps = grain.MapDataset.range(sys.maxsize)  # Element s is step s; no epochs.
  return steps.random_map(_WindowBatch(tokens, seq_len, global_batch_size, rows), seed=seed)


@dataclasses.dataclass(frozen=True, eq=False)
class _ChunkBatch:
  """map fn: the global batch's chunk indices [global_batch] -> this process's rows."""

  chunks: np.ndarray  # [n_chunks, seq_len + 1] int32
  rows: slice

  def __call__(self, chunk_ids: np.ndarray) -> dict[str, np.ndarray]:
    return _inputs_and_targets(self.chunks[chunk_ids[self.rows]])


def _packed_chunks(tokens, seq_len, global_batch_size, seed, rows) -> grain.MapDataset:
  chunks = _chunk(tokens, seq_len)  # [n_chunks, seq_len + 1]
  # Shuffling indices, not rows, keeps every process from gathering the whole batch.
  # repeat() after shuffle() reshuffles each epoch; batches may straddle two epochs.
  chunk_ids = grain.MapDataset.range(len(chunks)).shuffle(seed=seed).repeat()
  batches = chunk_ids.batch(global_batch_size, drop_remainder=True)
  return batches.map(_ChunkBatch(chunks, rows))


def _gather(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
  return tokens[starts[:, None] + np.arange(seq_len + 1)]  # [len(starts), seq_len + 1]


def _inputs_and_targets(windows: np.ndarray) -> dict[str, np.ndarray]:
  # windows: [rows, seq_len + 1]; targets are the inputs shifted left by one.
  return {
      "inputs": np.ascontiguousarray(windows[:, :-1]),
      "targets": np.ascontiguousarray(windows[:, 1:]),
  }


def _chunk(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  """Consecutive non-overlapping windows [n_chunks, seq_len + 1]; the tail is dropped."""
  n_chunks = len(tokens) // (seq_len + 1)
  return tokens[: n_chunks * (seq_len + 1)].reshape(n_chunks, seq_len + 1)


def _sample_windows(tokens, seq_len, count, seed) -> np.ndarray:
  starts = np.random.default_rng(seed).integers(0, len(tokens) - seq_len, size=count)
  return _gather(tokens, starts, seq_len)  # [count, seq_len + 1]


def _subset(chunks: np.ndarray, count: int, seed: int) -> np.ndarray:
  """A fixed subset of `count` chunks (all of them when there are fewer), in order."""
  if len(chunks) <= count:
    return chunks
  picked = np.random.default_rng(seed).choice(len(chunks), size=count, replace=False)
  return chunks[np.sort(picked)]


def _eval_batches(windows: np.ndarray, global_batch: int, rows: slice) -> list[dict]:
  """Global batches of `windows` [n, seq_len + 1], the last padded; this process's rows."""
  num_batches = math.ceil(len(windows) / global_batch)
  padded = np.zeros((num_batches * global_batch, windows.shape[1]), np.int32)
  padded[: len(windows)] = windows
  real = np.arange(len(padded)) < len(windows)  # [num_batches * global_batch]
  weights = np.broadcast_to(real[:, None], (len(padded), windows.shape[1] - 1))
  batches = []
  for b in range(num_batches):
    local = slice(b * global_batch + rows.start, b * global_batch + rows.stop)
    batch = _inputs_and_targets(padded[local])
    batch["weights"] = weights[local].astype(np.float32)
    for array in batch.values():
      array.flags.writeable = False
    batches.append(batch)
  return batches

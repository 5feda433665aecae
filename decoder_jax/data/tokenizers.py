"""Tokenizers: a character vocabulary (nanoGPT's shakespeare_char) and SentencePiece.

Both expose the same small surface: `vocab_size`, `eos_id` (and `bos_id`, `pad_id`, None
where the vocabulary has none), `encode(text) -> list[int]`,
`encode_array(text) -> int32 array`, `decode(ids) -> str`. `save_tokenizer` /
`load_tokenizer` store one in a directory (a training workdir, possibly on GCS) so that
`generate` can rebuild exactly the tokenizer a model was trained with. A Hugging Face
`tokenizer.json` tokenizer (decoder_jax.interop.hf_tokenizer.HFTokenizer) has the same
surface and is saved and loaded by the same two functions.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm
from etils import epath

from decoder_jax.errors import ConfigError, NotFound

_DESCRIPTOR = "tokenizer.json"
_SPM_FILE = "tokenizer.model"
_HF_DIR = "hf_tokenizer"  # HF's own files (one also named tokenizer.json) go in a subfolder


def _as_flat_ids(ids) -> np.ndarray:
  """Accepts a list, numpy or jax array of ids; returns a flat int64 array."""
  return np.asarray(ids, dtype=np.int64).reshape(-1)


class CharTokenizer:
  """One id per character; ids follow the sorted character set (as in nanoGPT)."""

  def __init__(self, chars: Sequence[str]):
    if not chars:
      raise ValueError("CharTokenizer needs at least one character.")
    if any(len(c) != 1 for c in chars) or list(chars) != sorted(set(chars)):
      raise ValueError("CharTokenizer chars must be distinct single characters, sorted.")
    self._chars = "".join(chars)
    # Sorted code points let `encode` look ids up with one vectorised searchsorted.
    self._code_points = np.array([ord(c) for c in chars], dtype=np.uint32)  # [vocab]

  @classmethod
  def from_text(cls, text: str) -> CharTokenizer:
    return cls(sorted(set(text)))

  @property
  def chars(self) -> str:
    return self._chars

  @property
  def vocab_size(self) -> int:
    return len(self._chars)

  @property
  def eos_id(self) -> int | None:
    return None  # A character vocabulary has no end-of-sequence symbol.

  @property
  def bos_id(self) -> int | None:
    return None

  @property
  def pad_id(self) -> int | None:
    return None

  def encode_array(self, text: str) -> np.ndarray:
    """Text -> int32 ids [len(text)]; raises ValueError naming unknown characters."""
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # [chars]
    ids = np.searchsorted(self._code_points, code_points)
    ids = np.minimum(ids, len(self._code_points) - 1)
    unknown = self._code_points[ids] != code_points
    if unknown.any():
      missing = sorted({chr(c) for c in code_points[unknown]})
      shown = ", ".join(repr(c) for c in missing[:20])
      more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
      raise ConfigError(
          f"CharTokenizer cannot encode {len(missing)} character(s) outside its "
          f"{self.vocab_size}-character vocabulary: {shown}{more}."
      )
    return ids.astype(np.int32)

  def encode(self, text: str) -> list[int]:
    return self.encode_array(text).tolist()

  def decode(self, ids) -> str:
    ids = _as_flat_ids(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"ids must lie in [0, {self.vocab_size}); got {ids.min()}..{ids.max()}.")
    return self._code_points[ids].tobytes().decode("utf-32-le")


# Training defaults chosen for language modelling on raw text: keep the text exactly
# (identity normalisation, whitespace kept, "\n" as its own piece) so decode(encode(x)) == x
# for text in the character set, and no dummy "▁" prefix, so a word at the start of a line
# is tokenised the same in training (one line per sentence) as inside a long document.
_SPM_TRAIN_DEFAULTS = dict(
    model_type="unigram",
    character_coverage=1.0,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    user_defined_symbols=["\n"],
    input_sentence_size=10_000_000,  # Bounds memory on big corpora; small ones are read whole.
    shuffle_input_sentence=True,
    minloglevel=2,  # The trainer otherwise logs thousands of lines to stderr.
)

# For a vocabulary of separate sentences (a seq2seq task's joint vocabulary): a word at a
# sentence's start is the same piece as inside one ("▁Deux", not "Deux": the dummy
# prefix), no "\n" piece (no example holds one), and a padding id of its own beside
# <unk> 0, <s> 1 and </s> 2, so padding is never a real token.
SENTENCE_OPTIONS = dict(add_dummy_prefix=True, user_defined_symbols=[], pad_id=3,
                        pad_piece="<pad>")


class SentencePieceTokenizer:
  """A SentencePiece model, held as its serialized proto so it can be saved anywhere."""

  def __init__(self, model_proto: bytes):
    self._model_proto = bytes(model_proto)
    self._processor = spm.SentencePieceProcessor(model_proto=self._model_proto)

  @classmethod
  def train(
      cls,
      corpus_path: str | os.PathLike | Sequence[str | os.PathLike],
      model_prefix: str | os.PathLike,
      vocab_size: int,
      **kw,
  ) -> SentencePieceTokenizer:
    """Trains on one text file (or several); writes `model_prefix`.model and .vocab.

    `kw` overrides the trainer options above (any SentencePieceTrainer flag).
    """
    paths = [corpus_path] if isinstance(corpus_path, (str, os.PathLike)) else list(corpus_path)
    for path in paths:
      if not os.path.isfile(path):
        raise NotFound(f"SentencePiece training input {path} does not exist.")
    return cls._train(model_prefix, vocab_size, input=[os.fspath(p) for p in paths], **kw)

  @classmethod
  def train_from_text(
      cls, text: str, model_prefix: str | os.PathLike, vocab_size: int, **kw
  ) -> SentencePieceTokenizer:
    """Like `train`, from an in-memory text (one training sentence per line)."""
    lines = [line for line in text.splitlines() if line]
    if not lines:
      raise ConfigError("Cannot train SentencePiece on an empty text.")
    return cls._train(model_prefix, vocab_size, sentence_iterator=iter(lines), **kw)

  @classmethod
  def train_on_sentences(cls, sentences: Sequence[str], vocab_size: int, *, seed: int = 0,
                         **kw) -> SentencePieceTokenizer:
    """Trains in memory on `sentences` (one training sentence each); writes no file.

    `seed` fixes SentencePiece's random generator (the sentence sampling of corpora past
    input_sentence_size), so the same sentences and options give the same vocabulary.
    """
    sentences = [s for s in sentences if s]
    if not sentences:
      raise ConfigError("Cannot train SentencePiece on no sentences.")
    if vocab_size < 1:
      raise ConfigError(f"A SentencePiece vocab_size must be positive; got {vocab_size}.")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model,
                                     vocab_size=vocab_size, **{**_SPM_TRAIN_DEFAULTS, **kw})
    except RuntimeError as e:  # e.g. a vocab_size the text cannot fill
      raise ConfigError(f"SentencePiece training failed: {e}") from None
    return cls(model.getvalue())

  @classmethod
  def _train(cls, model_prefix, vocab_size, **kw) -> SentencePieceTokenizer:
    options = {**_SPM_TRAIN_DEFAULTS, **kw}
    if vocab_size < 1:
      raise ConfigError(f"A SentencePiece vocab_size must be positive; got {vocab_size}.")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    try:
      spm.SentencePieceTrainer.train(
          model_prefix=os.fspath(model_prefix), vocab_size=vocab_size, **options
      )
    except RuntimeError as e:  # e.g. a vocab_size the text cannot fill
      raise ConfigError(f"SentencePiece training failed: {e}") from None
    return cls.load(f"{os.fspath(model_prefix)}.model")

  @classmethod
  def load(cls, model_path: str | os.PathLike) -> SentencePieceTokenizer:
    path = epath.Path(model_path)
    if not path.exists():
      raise NotFound(f"SentencePiece model {path} does not exist.")
    return cls(path.read_bytes())

  @property
  def model_proto(self) -> bytes:
    return self._model_proto

  @property
  def processor(self) -> spm.SentencePieceProcessor:
    """The loaded processor, for per-piece queries (e.g. stop strings' token bytes)."""
    return self._processor

  @property
  def vocab_size(self) -> int:
    return self._processor.get_piece_size()

  @property
  def eos_id(self) -> int | None:
    eos = self._processor.eos_id()
    return None if eos < 0 else eos

  @property
  def bos_id(self) -> int | None:
    bos = self._processor.bos_id()
    return None if bos < 0 else bos

  @property
  def pad_id(self) -> int | None:
    pad = self._processor.pad_id()
    return None if pad < 0 else pad

  def encode(self, text: str) -> list[int]:
    return self._processor.encode(text)

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self._processor.encode(text), dtype=np.int32)

  def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
    """Encodes many documents at once (SentencePiece spreads them over threads)."""
    return self._processor.encode(list(texts))

  def decode(self, ids) -> str:
    return self._processor.decode(_as_flat_ids(ids).tolist())


Tokenizer = CharTokenizer | SentencePieceTokenizer


def save_tokenizer(tokenizer: Tokenizer, directory: str | os.PathLike) -> None:
  """Writes directory/tokenizer.json (plus tokenizer.model for SentencePiece)."""
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  if isinstance(tokenizer, CharTokenizer):
    descriptor = {"type": "char", "chars": tokenizer.chars}
  elif isinstance(tokenizer, SentencePieceTokenizer):
    (directory / _SPM_FILE).write_bytes(tokenizer.model_proto)
    descriptor = {"type": "sentencepiece", "model_file": _SPM_FILE}
  elif type(tokenizer).__name__ == "HFTokenizer":  # by name: `tokenizers` is optional
    tokenizer.save(directory / _HF_DIR)
    descriptor = {"type": "huggingface", "directory": _HF_DIR}
  else:
    raise TypeError(f"Cannot save tokenizer of type {type(tokenizer).__name__}.")
  descriptor["vocab_size"] = tokenizer.vocab_size
  (directory / _DESCRIPTOR).write_text(json.dumps(descriptor, ensure_ascii=False, indent=1))


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
  """Inverse of `save_tokenizer`; also reads a Hugging Face model directory directly."""
  descriptor_path = epath.Path(directory) / _DESCRIPTOR
  if not descriptor_path.exists():
    raise NotFound(
        f"{descriptor_path} does not exist; was the tokenizer saved with save_tokenizer?"
    )
  descriptor = json.loads(descriptor_path.read_text())
  kind = descriptor.get("type")
  if kind is None and "model" in descriptor:  # Hugging Face's own tokenizer.json
    from decoder_jax.interop.hf_tokenizer import HFTokenizer
    return HFTokenizer.load(directory)
  if kind == "char":
    tokenizer = CharTokenizer(list(descriptor["chars"]))
  elif kind == "sentencepiece":
    tokenizer = SentencePieceTokenizer.load(epath.Path(directory) / descriptor["model_file"])
  elif kind == "huggingface":
    from decoder_jax.interop.hf_tokenizer import HFTokenizer
    tokenizer = HFTokenizer.load(epath.Path(directory) / descriptor["directory"])
  else:
    raise ConfigError(f"{descriptor_path}: unknown tokenizer type {kind!r}.")
  if tokenizer.vocab_size != descriptor.get("vocab_size", tokenizer.vocab_size):
    raise ConfigError(f"{descriptor_path}: vocab_size does not match the stored tokenizer.")
  return tokenizer
